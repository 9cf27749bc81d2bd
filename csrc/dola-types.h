// The values that cross the core's boundaries: what a context is made with, what one generation
// decodes with, and what a step or a scored sequence reports. Plain structs, no llama.cpp state,
// so that decoders, the sampler and the bindings can use them without the session.
#pragma once

#include "dola-switches.h"

#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace dola {

struct context_params {
    uint32_t n_ctx = 2048;
    int32_t n_threads = 0;  // 0 = hardware concurrency
    uint32_t n_batch = 512;
    std::string kv_type = "f16";  // KV cache type: f16, f32, q8_0
    bool capture = true;          // register the layer-capture eval callback (needed for DoLa)
    bool adaptive_threads = true; // use fewer threads while other processes keep cores busy
    switches env;                 // the DOLA_CPP_* switches this context follows
};

// Mirrors dola_cpp.DecodeConfig.
struct decode_params {
    std::vector<int32_t> candidates;  // premature candidate layers; empty = plain decoding
    int32_t mature = -1;              // mature layer; -1 or n_layer = the model's final logits
    double relative_top = 0.1;
    float repetition_penalty = 1.0f;
    bool premature_norm = false;
    // Activation Decoding: scores lowered by alpha times the entropy over the context positions
    // of info_layer's early-exit distribution (0 <= info_layer < n_layer)
    bool activation = false;
    float alpha = 0.5f;
    int32_t info_layer = -1;
    // sampling; temperature <= 0 = greedy
    float temperature = 0.0f;
    int32_t top_k = 0;
    float top_p = 1.0f;
    float min_p = 0.0f;
    uint32_t seed = 0xFFFFFFFF;
    // llama.cpp's DRY ("don't repeat yourself") sampler, as llama-server names its settings:
    // a token that would extend a sequence already in the context by more than
    // dry_allowed_length tokens loses dry_multiplier * dry_base^(length - dry_allowed_length).
    // dry_multiplier 0 = off; dry_penalty_last_n: tokens scanned, -1 = the whole context.
    float dry_multiplier = 0.0f;
    float dry_base = 1.75f;
    int32_t dry_allowed_length = 2;
    int32_t dry_penalty_last_n = -1;
    std::vector<std::string> dry_sequence_breakers = {"\n", ":", "\"", "*"};  // llama-server's default
    // OpenAI's: a token's score loses frequency_penalty per time it occurs in the answer so far
    // (the tokens generated since the prompt, not the prompt) and presence_penalty once if it occurs
    float frequency_penalty = 0.0f;
    float presence_penalty = 0.0f;
    // OpenAI's: added to these tokens' scores (-100..100), last, after the penalties, DRY and the
    // end-of-answer bonus;
    // -100 bans the token
    std::map<int32_t, float> logit_bias;
    // GBNF text (llama.cpp's grammar format, start rule "root"; empty = none): the choice is
    // constrained to the tokens it allows, after everything above; once the grammar is complete
    // only end-of-generation tokens are allowed
    std::string grammar;
    // the n most probable tokens (0..20) each step and each scored token report, with their log-probs
    int32_t n_probs = 0;
};

struct step_result {
    int32_t token = -1;
    int32_t premature_layer = -1;  // -1 for plain decoding
    std::vector<float> jsd;        // per candidate (dynamic DoLa)
    float mature_logprob = 0.0f;   // log p_mature(token)
    float score = 0.0f;            // processed score of the token (after repetition penalty)
    float entropy = 0.0f;          // entropy of the mature distribution (nats)
    float top_logprob = 0.0f;      // log of the mature distribution's largest probability
    float activation_entropy = std::numeric_limits<float>::quiet_NaN();  // H of the token (Activation Decoding)
    // with n_probs > 0: the mature distribution's n best tokens and their log-probs (best first);
    // the log-prob of the token in the distribution it was chosen from (the log-softmax of the
    // processed scores: after the contrast, penalties, bias and grammar, before temperature) and
    // that distribution's n best (only tokens it allows: fewer when fewer have a finite log-prob)
    std::vector<int32_t> top_tokens;
    std::vector<float> top_logprobs_mature;
    float dola_logprob = std::numeric_limits<float>::quiet_NaN();
    std::vector<int32_t> dola_top_tokens;
    std::vector<float> dola_top_logprobs;
    // what the answer makes of the token (dola-answer): its risk, the text it lets through, and
    // the reason the answer ends here ("" while it goes on; counted is false when the token is an
    // end-of-generation token and so not part of the answer); held: the text an end now would
    // still show (a tail that may start a stop string, an unfinished character as U+FFFD)
    double risk = std::numeric_limits<double>::quiet_NaN();
    std::string piece, finish, held;
    bool counted = true;
    int32_t loop = 0;  // with finish "loop": the cycle's length in tokens
};

struct score_result {
    double total = 0.0;
    std::vector<float> token_scores;     // per continuation token
    std::vector<int32_t> premature_layers;  // per continuation token (-1 for plain)
    // per continuation token, as a generation step would report it: log p_mature(token), the
    // mature distribution's largest log-probability and entropy, the JSD of the premature layer
    std::vector<float> mature_logprobs, top_logprobs, entropies, jsd;
    // with n_probs > 0, per continuation token: the mature distribution's n best (id, log-prob)
    std::vector<std::vector<std::pair<int32_t, float>>> top_tokens;
};

// A text to score: tokens[n_prefix:] given tokens[:n_prefix]
struct scored_text {
    std::vector<int32_t> tokens;
    size_t n_prefix = 0;
};

struct timings {
    double prefill_ms = 0.0, decode_ms = 0.0, contrast_ms = 0.0;
    int64_t n_prefill = 0, n_decode = 0;
    // llama_decode calls (ubatches) in which layer rows were captured
    int64_t n_captured_ubatches = 0;
    int64_t n_capture_splits = 0;  // times the capture callback had ggml stop the graph and wait
    int64_t n_graph_rebuilds = 0;  // times new layers to keep made llama.cpp reserve and rebuild its graphs
    int64_t n_score_rows = 0;  // rows of scored texts decoded beside their shared prefix (texts that begin alike share theirs)
};

}  // namespace dola
