// Activation Decoding's context: the info layer's hidden rows of the tokens the KV cache holds,
// and H, the per-vocabulary entropy over those positions of the layer's early-exit distribution.
// H covers positions [0, end) of the sequence in place and is computed on demand: a few entries
// from their output rows (entropy_of), or every entry by streaming all positions through the
// projection (entropy_all). The streamed statistics are checkpointed at the boundary (what the
// next call can reuse of this one, e.g. all of a prompt but its last token) and at the prefix the
// last call shared with the one before (e.g. a few-shot primer), so a prompt that extends an
// earlier one projects only its new positions.
#pragma once

#include "decoders/decoder.h"
#include "dola-contrast.h"

#include <cstddef>
#include <cstdint>
#include <vector>

namespace dola {

class projector;

class context_entropy final : public context_entropy_source {
public:
    context_entropy(int32_t n_embd, int64_t n_vocab);

    // The layer the decoder now takes H of (-1: none) and whether it is projected through the
    // final norm. Rows of another layer are dropped, and checkpoints of another norm. Returns
    // true when an H in place no longer applies (another layer or norm than before).
    bool configure(int32_t layer, bool norm);
    int32_t layer() const { return layer_; }
    // The projection H is computed with, and the threads it may use.
    void set_projector(projector * p) { proj_ = p; }
    void set_n_threads(int32_t n) { n_threads_ = n; }

    // Rows of the first n_rows() cached tokens are stored.
    size_t n_rows() const { return len_; }
    // The next n tokens' rows, [n][n_embd].
    void append_rows(const float * rows, int32_t n);
    // The cache kept only its first n tokens: later rows and checkpoints go, and H with them.
    void truncate(size_t n);
    // As truncate, for a new sequence that shares its first n tokens with the last one (the
    // shared prefix is a checkpoint mark).
    void keep_prefix(size_t n);
    void clear();

    // H is now that of positions [0, end); statistics up to boundary are worth keeping.
    void begin(size_t boundary, size_t end);
    bool valid() const { return valid_; }
    void invalidate() { valid_ = false; }

    void entropy_of(const int32_t * ids, int32_t n, float * out) override;
    const float * entropy_all() override;

private:
    void add_rows(position_entropy & acc, size_t from, size_t to);

    int32_t n_embd_;
    int64_t n_vocab_;
    projector * proj_ = nullptr;
    int32_t n_threads_ = 1;
    int32_t layer_ = -1;       // the configured decoder's context layer
    int32_t rows_layer_ = -1;  // the layer hidden_ holds (kept while a decoder needs none)
    bool norm_ = false;
    std::vector<float> hidden_;  // [len_][n_embd]
    size_t len_ = 0;
    struct checkpoint {
        size_t len;
        position_entropy stats;
    };
    std::vector<checkpoint> ckpts_;  // at most 3, least recently used first
    size_t common_ = 0;              // tokens the last keep_prefix kept
    std::vector<float> H_;           // [n_vocab], NaN = not computed yet; meaningful when valid_
    bool valid_ = false;             // H is defined (a prompt or a scored sequence is in place)
    bool all_ = false;               // every entry computed
    size_t boundary_ = 0, end_ = 0;
    std::vector<float> proj_rows_, w_, normed_;  // scratch
    std::vector<int32_t> missing_;
};

}  // namespace dola
