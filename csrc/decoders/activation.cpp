// Activation Decoding (hkust-nlp/Activation_Decoding, "decoding by sharpness"): tokens whose
// info-layer activations are sharp (low entropy over the context positions) are favoured:
//   scores = relative-top-filtered log_softmax(z_mature) - alpha * H      (activation)
//   scores = DoLa's contrast (already relative-top filtered) - alpha * H   (activation_dola)
// where H_v is the entropy over context positions of softmax_p(z_info[p][v]), for the prompt's
// positions (the reference computes it once, at the first generated token). Only the entries in
// the relative-top set need H; the session computes those from the stored info-layer rows.
// Teacher-forced scores are the inner decoder's minus alpha * H[y], with H over every position
// of prefix and continuation, and no relative-top mask (the reference's lm_score computes the
// mask but does not apply it).
#include "decoders/decoder.h"

#include "dola-contrast.h"

#include <limits>
#include <utility>
#include <vector>

namespace dola {

namespace {

class activation_decoder : public decoder {
public:
    activation_decoder(std::unique_ptr<decoder> inner, int32_t info_layer, float alpha, double relative_top)
        : inner_(std::move(inner)), info_layer_(info_layer), alpha_(alpha), relative_top_(relative_top) {}

    const std::vector<int32_t> & layers() const override { return inner_->layers(); }
    int32_t context_layer() const override { return info_layer_; }

    void step(const decoder_rows & rows, float * lp, float * scores, step_result & res) override {
        inner_->step(rows, lp, scores, res);
        const int64_t V = rows.n_vocab;
        const float ninf = -std::numeric_limits<float>::infinity();
        if (inner_->layers().empty()) {
            // plain inner: its scores are the raw logits; use the filtered log-probabilities
            const float thr = relative_top_ > 0.0 ? relative_top_threshold(lp, V, relative_top_) : ninf;
            for (int64_t i = 0; i < V; ++i) scores[i] = lp[i] < thr ? ninf : lp[i];
        }
        // H only matters inside the relative-top set (elsewhere the score is -inf): a few entries,
        // unless the filter is off or the set is large
        ids_.clear();
        for (int64_t i = 0; i < V; ++i) {
            if (scores[i] != ninf) ids_.push_back((int32_t) i);
        }
        if (ids_.size() > (size_t) V / 16) {
            const float * H = rows.context->entropy_all();
            for (int32_t i : ids_) scores[i] -= alpha_ * H[i];
        } else {
            h_.resize(ids_.size());
            rows.context->entropy_of(ids_.data(), (int32_t) ids_.size(), h_.data());
            for (size_t k = 0; k < ids_.size(); ++k) scores[ids_[k]] -= alpha_ * h_[k];
        }
    }

    const float * score(const decoder_rows & rows, const score_options & opt, float * lp, float * work,
                        score_detail & detail) override {
        return inner_->score(rows, opt, lp, work, detail);
    }

    float context_score(int32_t y, context_entropy_source & context) const override {
        float h = 0.0f;
        context.entropy_of(&y, 1, &h);
        return -alpha_ * h;
    }

private:
    std::unique_ptr<decoder> inner_;
    int32_t info_layer_;
    float alpha_;
    double relative_top_;
    std::vector<int32_t> ids_;
    std::vector<float> h_;
};

}  // namespace

std::unique_ptr<decoder> make_activation_decoder(std::unique_ptr<decoder> inner, int32_t info_layer, float alpha,
                                                 double relative_top) {
    return std::make_unique<activation_decoder>(std::move(inner), info_layer, alpha, relative_top);
}

}  // namespace dola
