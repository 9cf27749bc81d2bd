#include "dola-context-entropy.h"

#include "dola-error.h"
#include "dola-project.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace dola {

context_entropy::context_entropy(int32_t n_embd, int64_t n_vocab) : n_embd_(n_embd), n_vocab_(n_vocab) {}

bool context_entropy::configure(int32_t layer, bool norm) {
    if (layer >= 0 && layer != rows_layer_) {  // the stored rows are one layer's
        len_ = 0;
        ckpts_.clear();
        rows_layer_ = layer;
    }
    if (norm != norm_) ckpts_.clear();  // the statistics also depend on the norm
    const bool stale = layer >= 0 && (layer != layer_ || norm != norm_);
    if (stale) valid_ = false;  // H of another layer or projection: prefill again
    norm_ = norm;
    layer_ = layer;
    return stale;
}

void context_entropy::append_rows(const float * rows, int32_t n) {
    const size_t E = (size_t) n_embd_;
    hidden_.resize((len_ + n) * E);
    std::memcpy(hidden_.data() + len_ * E, rows, n * E * sizeof(float));
    len_ += n;
}

void context_entropy::truncate(size_t n) {
    len_ = std::min(len_, n);
    ckpts_.erase(std::remove_if(ckpts_.begin(), ckpts_.end(), [&](const checkpoint & c) { return c.len > n; }),
                 ckpts_.end());
    valid_ = false;
}

void context_entropy::keep_prefix(size_t n) {
    truncate(n);
    common_ = n;
}

void context_entropy::clear() {
    len_ = 0;
    ckpts_.clear();
    valid_ = false;
}

void context_entropy::add_rows(position_entropy & acc, size_t from, size_t to) {
    const int64_t V = n_vocab_;
    // Project at most 64 positions (and 64 MB of logits) at a time: memory stays O(n_vocab).
    const size_t chunk = std::max<size_t>(1, std::min<size_t>(64, (size_t) (16u << 20) / (size_t) V));
    for (size_t p = from; p < to; p += chunk) {
        const int32_t n = (int32_t) std::min(chunk, to - p);
        proj_rows_.resize((size_t) n * V);
        proj_->project(hidden_.data() + p * n_embd_, n, norm_, proj_rows_.data());
        acc.add(proj_rows_.data(), n, n_threads_);
    }
}

void context_entropy::begin(size_t boundary, size_t end) {
    if (end > len_ || boundary > end) throw error("internal: context rows missing for Activation Decoding");
    boundary_ = boundary;
    end_ = end;
    H_.assign(n_vocab_, std::numeric_limits<float>::quiet_NaN());
    all_ = false;
    valid_ = true;
    normed_.clear();
}

void context_entropy::entropy_of(const int32_t * ids, int32_t n, float * out) {
    if (!valid_) throw error("internal: no context for Activation Decoding");
    missing_.clear();
    for (int32_t i = 0; i < n; ++i) {
        if (std::isnan(H_[ids[i]])) missing_.push_back(ids[i]);
    }
    // a scored continuation may repeat a token; sort+unique, not a search per id (sets reach V/16)
    std::sort(missing_.begin(), missing_.end());
    missing_.erase(std::unique(missing_.begin(), missing_.end()), missing_.end());
    if (!missing_.empty()) {
        const int32_t m = (int32_t) missing_.size();
        const int32_t E = n_embd_;
        w_.resize((size_t) m * E);
        if (!proj_->output_rows(missing_.data(), m, w_.data())) {
            entropy_all();  // the output matrix is not readable here: project everything
        } else {
            const float * hidden = hidden_.data();
            if (norm_) {  // normed once per context
                if (normed_.size() != end_ * E) {
                    normed_.resize(end_ * E);
                    proj_->normalize(hidden, (int32_t) end_, normed_.data());
                }
                hidden = normed_.data();
            }
            std::vector<float> h(m);
            entropy_of_rows(hidden, (int64_t) end_, w_.data(), m, E, h.data(), n_threads_);
            for (int32_t k = 0; k < m; ++k) H_[missing_[k]] = h[k];
        }
    }
    for (int32_t i = 0; i < n; ++i) out[i] = H_[ids[i]];
}

const float * context_entropy::entropy_all() {
    if (!valid_) throw error("internal: no context for Activation Decoding");
    if (all_) return H_.data();
    // start from the longest checkpoint of this sequence's prefix (all kept ones are: a
    // checkpoint past the kept cache is dropped with it)
    position_entropy acc;
    size_t pos = 0, best = ckpts_.size();
    for (size_t i = 0; i < ckpts_.size(); ++i) {
        if (ckpts_[i].len <= end_ && ckpts_[i].len > pos) {
            pos = ckpts_[i].len;
            best = i;
        }
    }
    if (best < ckpts_.size()) {
        acc = ckpts_[best].stats;
        std::rotate(ckpts_.begin() + best, ckpts_.begin() + best + 1, ckpts_.end());  // most recently used last
    } else {
        acc.reset(n_vocab_);
    }
    for (size_t mark : {common_, boundary_}) {
        if (mark <= pos || mark > end_) continue;
        add_rows(acc, pos, mark);
        pos = mark;
        if (ckpts_.size() >= 3) ckpts_.erase(ckpts_.begin());
        ckpts_.push_back({mark, acc});
    }
    add_rows(acc, pos, end_);
    acc.entropy(H_.data());
    all_ = true;
    return H_.data();
}

}  // namespace dola
