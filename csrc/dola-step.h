// The end of a generation step, shared by the session and the batch engine: a decoder's scores for
// one position through the sampler to a token, with the step's diagnostics.
#pragma once

#include "decoders/decoder.h"
#include "dola-capture.h"
#include "dola-model.h"
#include "dola-sampler.h"
#include "dola-types.h"

#include <cstdint>
#include <vector>

namespace dola {

// Throws dola::error on layers out of range for the model, sampling values or logit-bias ids it
// cannot use, and Activation Decoding's values; returns the mature layer (-1 resolved to n_layer).
int32_t check_decode_params(const model & m, const decode_params & p);

// scores and lp ([n_vocab]) as the decoder's step left them (lp: the mature log-softmax); history:
// the tokens the sequence holds, the first n_prompt of them its prompt. Fills res's token, score,
// mature and top log-probs (n_probs of them), and the token's context entropy when context is set.
// chosen_lp: scratch.
void finish_step(sampler & smp, float * scores, float * lp, int64_t n_vocab, const std::vector<llama_token> & history,
                 size_t n_prompt, float eos_bonus, int32_t n_probs, context_entropy_source * context,
                 std::vector<float> & chosen_lp, step_result & res);

// llama.cpp context plumbing the session and the batch engine share (they reach into llama.cpp's
// internal context: its scheduler and parameters).
// Installs (capture) or removes (null) the capture's eval callback in the context's scheduler.
void set_eval_callback(llama_context * ctx, layer_capture * capture);
// Has llama.cpp reserve and rebuild its graphs before the next decode (new layers to keep as
// graph outputs).
void rebuild_graphs(llama_context * ctx);

}  // namespace dola
