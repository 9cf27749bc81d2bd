// Decoders: how one position's logits become the scores a token is chosen by. Shaped like
// llama.cpp's llama_sampler_i: a decoder says which layers the engine must capture and project
// (`layers`), turns a position's rows into scores for sampling (`step`) and into one token's score
// for teacher-forced scoring (`score`). The session gathers the rows, calls the decoder, applies
// the repetition penalty and samples; it knows no decoder by name. A new decoder is one file here,
// a case in make_decoder, the binding's parameters and the Python option list.
#pragma once

#include "dola-types.h"

#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

namespace dola {

// Activation Decoding's per-vocabulary entropy over the context positions of the decoder's
// context_layer(), computed by the session on demand.
class context_entropy_source {
public:
    virtual ~context_entropy_source() = default;
    // out[i] = H[ids[i]], computing the entries not known yet (cheap for a few entries).
    virtual void entropy_of(const int32_t * ids, int32_t n, float * out) = 0;
    // H of every entry ([n_vocab]; one pass of every context position through the output matrix).
    virtual const float * entropy_all() = 0;
};

// A position's rows left where the projection computed them (a GPU), with DoLa's JSD already
// computed there: a decoder fetches only the rows it needs.
class device_rows {
public:
    virtual ~device_rows() = default;
    // The log-softmax ([n_vocab] each) of rows rows[0..n), one wait for all; row K (the number of
    // candidates) is the mature one.
    virtual void log_softmax(int32_t n, const int32_t * rows, float * const * out) = 0;
    const float * jsd = nullptr;  // [K]: JSD(mature || candidate k)
    double entropy = 0.0;         // of the mature distribution (nats)
};

// One position's logits, as the session gathered them.
struct decoder_rows {
    const float * mature = nullptr;  // [n_vocab]: the final layer's (or the early-exit mature layer's)
    float * projected = nullptr;     // [layers().size()][n_vocab], in layers() order; may be overwritten
    int64_t n_vocab = 0;
    int32_t n_threads = 1;
    // the entropy over context positions of context_layer() (null when the decoder needs none,
    // and in teacher-forced scoring, where it is known only after the last position)
    context_entropy_source * context = nullptr;
    // Set instead of mature/projected when the decoder asked for device rows (wants_device_rows)
    // and the projection's backend could compute them.
    device_rows * device = nullptr;
};

// The DoLa repository's lm_score options for one teacher-forced position.
struct score_options {
    bool post_softmax = false;
    double relative_top = 0.0;
    float mask_value = -1000.0f;
};

// What a decoder says about one teacher-forced position besides the token's score.
struct score_detail {
    int32_t layer = -1;  // the layer the position was contrasted with; -1 for none
    float jsd = std::numeric_limits<float>::quiet_NaN();  // JSD(mature || that layer), dynamic DoLa
};

class decoder {
public:
    virtual ~decoder() = default;
    // Hidden layers to capture and project for every position this decoder sees, in order.
    virtual const std::vector<int32_t> & layers() const = 0;
    // lp: n_vocab, the mature log-softmax (for diagnostics); scores: n_vocab, what the repetition
    // penalty and the sampler see. Fills the step's diagnostics except token/score/mature_logprob.
    virtual void step(const decoder_rows & rows, float * lp, float * scores, step_result & res) = 0;
    // The scores of every token at this position: returns n_vocab values, lp or work (work: n_vocab
    // scratch; lp: n_vocab, left holding the mature log-softmax). May overwrite the rows' projections.
    virtual const float * score(const decoder_rows & rows, const score_options & opt, float * lp, float * work,
                                score_detail & detail) = 0;
    // A layer whose rows the decoder needs at every context position, reduced to a per-vocabulary
    // entropy over positions (decoder_rows::context_entropy); -1 for none.
    virtual int32_t context_layer() const { return -1; }
    // Whether step() takes device_rows (DoLa with several candidates: only K JSD values and two
    // rows need to leave the device).
    virtual bool wants_device_rows() const { return false; }
    // What the context entropy adds to token y's teacher-forced score, once it is known.
    virtual float context_score(int32_t y, context_entropy_source & context) const { return 0.0f; }
};

// The decoder a decode_params asks for: plain (no premature candidates) or DoLa, wrapped by
// Activation Decoding when it is on.
std::unique_ptr<decoder> make_decoder(const decode_params & p);

std::unique_ptr<decoder> make_plain_decoder();
std::unique_ptr<decoder> make_dola_decoder(const std::vector<int32_t> & candidates, double relative_top);
// inner: plain (activation) or DoLa (activation_dola); its scores are relative-top filtered and
// lowered by alpha times the context entropy of info_layer.
std::unique_ptr<decoder> make_activation_decoder(std::unique_ptr<decoder> inner, int32_t info_layer, float alpha,
                                                 double relative_top);

}  // namespace dola
