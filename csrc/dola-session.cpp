#include "dola-session.h"

#include "dola-contrast.h"
#include "dola-error.h"
#include "dola-log.h"
#include "dola-step.h"

#include "llama-context.h"  // internal: the scheduler, to read the kept layers

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <thread>

namespace dola {

session::session(std::shared_ptr<model> mdl, const context_params & params)
    : model_(std::move(mdl)),
      env_(params.env),
      n_threads_(checked_threads(params.n_threads)),
      threads_now_(n_threads_),
      governor_(n_threads_, params.adaptive_threads),
      capture_(model_->n_layer(), model_->n_embd(), env_.capture_callback),
      sampler_(model_->vocab(), model_->n_vocab(), model_->eog_tokens()),
      context_(model_->n_embd(), model_->n_vocab()) {
    const int32_t n_ctx_train = model_->n_ctx_train();
    n_ctx_ = params.n_ctx > 0 ? params.n_ctx : (uint32_t) std::max(n_ctx_train, 512);
    n_batch_ = std::max<uint32_t>(1, std::min(params.n_batch, n_ctx_));
    llama_context_params cp = context_params_for(n_ctx_, n_batch_, n_threads_, params.kv_type, abort_cb, this);
    // sequence 0 is the session's; score_batch decodes texts side by side as sequences 1.. on
    // sequence 0's cells, in one unified cache (shared cells; one stream of n_ctx cells)
    cp.n_seq_max = 1 + max_score_texts;
    cp.kv_unified = true;
    cp.n_outputs_max = std::max<uint32_t>(n_batch_, cp.n_seq_max);  // llama.cpp reserves a row per sequence
    capture_enabled_ = params.capture;  // the callback is installed per ubatch, when it has rows to capture
    clear_last_error();
    ctx_.reset(llama_init_from_model(model_->get(), cp));
    if (!ctx_) throw error(with_detail("could not create a context of " + std::to_string(n_ctx_) + " tokens"));
    n_ctx_ = llama_n_ctx(ctx_.get());
    context_.set_n_threads(threads_now_);
    last_check_ = std::chrono::steady_clock::now();
}

session::~session() {
    if (!model_->free_remote([this] {
            ctx_.reset();
            projector_.reset();
        })) {  // a server is gone: what is left stays unfreed
        (void) ctx_.release();
        (void) projector_.release();
    }
}

bool session::abort_cb(void * data) {
    auto * self = static_cast<session *>(data);
    if (self->cancel_.load(std::memory_order_relaxed)) return true;
    if (!self->interrupt_check_) return false;
    const auto now = std::chrono::steady_clock::now();
    if (now - self->last_check_ < std::chrono::milliseconds(20)) return false;
    self->last_check_ = now;
    if (self->interrupt_check_()) {
        self->cancel_.store(true);
        return true;
    }
    return false;
}

projector & session::need_projector() {
    if (!projector_) adopt_projector(std::make_unique<projector>(model_->get(), env_));
    return *projector_;
}

void session::adopt_projector(std::unique_ptr<projector> p) {
    if (!p) return;
    projector_ = std::move(p);
    context_.set_projector(projector_.get());
}

void session::configure(const decode_params & p) {
    const int32_t N = model_->n_layer();
    const int32_t mature = check_decode_params(*model_, p);

    std::unique_ptr<decoder> dec = make_decoder(p);
    // the decoder's layers, then the mature layer when it is an early exit
    std::vector<int32_t> layers = dec->layers();
    if (mature != N && std::find(layers.begin(), layers.end(), mature) == layers.end()) layers.push_back(mature);
    const int32_t ctx_layer = dec->context_layer();
    if ((!layers.empty() || ctx_layer >= 0) && !capture_enabled_) {
        throw error("this context was created without layer capture; DoLa, Activation Decoding and early exit need it");
    }
    if (!layers.empty() || ctx_layer >= 0) {
        need_projector();
        if (p.premature_norm && !projector_->norm_supported()) {
            throw error("premature_norm is not supported for architecture '" + model_->architecture() + "'");
        }
    } else if (!projector_) {  // (plain_final_projector makes one: only when there is none)
        adopt_projector(plain_final_projector(*dec, mature, *model_, env_, capture_enabled_));
    }
    if (projector_) projector_->set_n_threads(threads_now_);
    const bool fuse = fuses_final(*dec, mature, *model_, env_, projector_.get());
    if (layers != capture_layers_ || fuse != fuse_final_) have_outputs_ = false;
    capture_layers_ = layers;
    fuse_final_ = fuse;
    capture_.set_layers(layers);
    capture_.set_final(fuse);
    if (context_.configure(ctx_layer, p.premature_norm)) have_outputs_ = false;
    capture_.set_context_layer(ctx_layer);
    decoder_ = std::move(dec);

    params_ = p;
    params_.mature = mature;
    sampler_.configure(p, n_ctx_);
}

void session::check_prompt(const std::vector<llama_token> & toks) const {
    if (toks.empty()) throw error("the prompt is empty");
    for (llama_token t : toks) model_->check_token(t);
    if (toks.size() > n_ctx_) throw prompt_too_long(toks.size(), n_ctx_);
}

void session::sync_cache_after_failure() {
    llama_memory_t mem = llama_get_memory(ctx_.get());
    const llama_pos pos_max = llama_memory_seq_pos_max(mem, 0);
    const size_t kept = pos_max < 0 ? 0 : std::min(tokens_.size(), (size_t) pos_max + 1);
    tokens_.resize(kept);
    context_.truncate(kept);
    have_outputs_ = false;
}

void session::update_threads() {
    const int32_t n = governor_.threads();
    if (n == threads_now_) return;
    threads_now_ = n;
    llama_set_n_threads(ctx_.get(), n, n);
    if (projector_) projector_->set_n_threads(n);
    context_.set_n_threads(n);
}

void session::set_capture_callback(bool on) {
    if (on == callback_on_) return;
    set_eval_callback(ctx_.get(), on ? &capture_ : nullptr);
    callback_on_ = on;
}

void session::decode_chunk(const llama_token * toks, int32_t n, int32_t row_begin, int32_t row_end, bool context) {
    context = context && context_layer() >= 0;
    owned_batch b(n);
    llama_batch & bt = b.get();
    const llama_pos pos0 = (llama_pos) tokens_.size();
    for (int32_t i = 0; i < n; ++i) {
        bt.token[i] = toks[i];
        bt.pos[i] = pos0 + i;
        bt.n_seq_id[i] = 1;
        bt.seq_id[i][0] = 0;
        bt.logits[i] = i >= row_begin && i < row_end;
    }
    bt.n_tokens = n;
    decode_batch(bt, row_begin, row_end, context);
    if (context) check_context_captured();
    append_decoded(toks, n, context);
    if (row_end > row_begin) check_layers_captured();
}

void session::append_decoded(const llama_token * toks, int32_t n, bool context) {
    if (context && context_.n_rows() == tokens_.size()) context_.append_rows(capture_.context_rows(), n);
    tokens_.insert(tokens_.end(), toks, toks + n);
}

void session::decode_batch(llama_batch & bt, int32_t row_begin, int32_t row_end, bool context) {
    capture_.expect(bt.n_tokens, row_begin, row_end, context);
    const bool outputs = capture_enabled_ && capture_.outputs_mode();
    // new layers to keep as graph outputs: llama.cpp must reserve and rebuild its graphs
    if (outputs && capture_.take_new_marks()) {
        rebuild_graphs(ctx_.get());
        ++timings_.n_graph_rebuilds;
    }
    set_capture_callback(capture_enabled_ && capture_.needs_callback());
    update_threads();
    int32_t rc;
    clear_last_error();
    if (outputs) {
        layer_capture::building marks(capture_);
        rc = llama_decode(ctx_.get(), bt);
        if (rc == 0) capture_.collect(ctx_->get_sched());
    } else {
        rc = llama_decode(ctx_.get(), bt);
    }
    timings_.n_captured_ubatches += capture_.called() ? 1 : 0;
    timings_.n_capture_splits += capture_.n_splits();
    if (rc == 2) {
        sync_cache_after_failure();
        throw aborted();
    }
    if (rc != 0) {
        sync_cache_after_failure();
        if (rc == 1) throw error("the context is full (" + std::to_string(n_ctx_) + " tokens); use a larger n_ctx");
        throw error(with_detail("llama_decode failed with code " + std::to_string(rc)));
    }
}

void session::check_context_captured() {
    if (capture_.context_seen()) return;
    have_outputs_ = false;
    throw error(context_capture_failure(context_layer(), model_->architecture()));
}

void session::check_layers_captured() {
    if (capture_.layers().empty() || capture_.complete()) return;
    have_outputs_ = false;
    throw error(capture_failure(capture_, model_->architecture()));
}

void session::clear() {
    llama_memory_clear(llama_get_memory(ctx_.get()), true);
    tokens_.clear();
    have_outputs_ = false;
    context_.clear();
}

size_t session::keep_cached_prefix(const std::vector<llama_token> & toks, size_t max_keep) {
    if (context_layer() >= 0) max_keep = std::min(max_keep, context_.n_rows());  // rows to rebuild H from
    const size_t common = keep_common_prefix(ctx_.get(), 0, tokens_, toks, max_keep);
    context_.keep_prefix(common);
    have_outputs_ = false;
    return common;
}

void session::prefill(const std::vector<llama_token> & prompt) {
    check_prompt(prompt);
    n_prompt_ = prompt.size();
    sampler_.restart();  // a new answer: the grammar from its start
    const auto t0 = std::chrono::steady_clock::now();
    const size_t common = keep_cached_prefix(prompt, prompt.size() - 1);  // always decode the last token
    for (size_t i = common; i < prompt.size(); i += n_batch_) {
        const int32_t n = (int32_t) std::min<size_t>(n_batch_, prompt.size() - i);
        const bool last = i + n == prompt.size();
        decode_chunk(prompt.data() + i, n, last ? n - 1 : 0, last ? n : 0, true);
    }
    // Activation Decoding: H over the prompt's positions, once per prompt (the reference computes
    // it at the first generated token); the statistics of all but the last token are kept for
    // the next prompt that extends this one.
    if (context_layer() >= 0) context_.begin(prompt.size() - 1, prompt.size());
    have_outputs_ = true;
    // llama_decode returns once a GPU has the work queued, unless the capture stopped the graph:
    // wait here, so that the prompt's time is the prompt's and not the first token's
    llama_synchronize(ctx_.get());
    timings_.prefill_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    timings_.n_prefill += (int64_t) (prompt.size() - common);
}

std::vector<step_result> session::run(answer_text & answer, const std::vector<float> & eos_bonus, size_t first,
                                      int32_t max_steps) {
    std::vector<step_result> out;
    for (int32_t k = 0; k < max_steps && !answer.ended(); ++k) {
        const size_t i = first + (size_t) k;
        step_result st = sample(i < eos_bonus.size() ? eos_bonus[i] : 0.0f);
        answer.add(st);
        const llama_token token = st.token;
        out.push_back(std::move(st));
        if (!answer.ended()) accept(token);
    }
    return out;
}

void session::accept(llama_token token) {
    model_->check_token(token);
    if (tokens_.size() >= n_ctx_) throw error("the context is full (" + std::to_string(n_ctx_) + " tokens)");
    sampler_.accept(token);  // the grammar's check first: a token it rejects is not decoded
    const auto t0 = std::chrono::steady_clock::now();
    decode_chunk(&token, 1, 0, 1);
    have_outputs_ = true;
    timings_.decode_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    timings_.n_decode += 1;
}

decoder_rows session::rows_for(const float * row_proj, int32_t row) {
    const int32_t N = model_->n_layer();
    const int64_t V = model_->n_vocab();
    decoder_rows rows;
    rows.n_vocab = V;
    rows.context = context_.valid() ? &context_ : nullptr;
    rows.n_threads = threads_now_;
    rows.projected = const_cast<float *>(row_proj);
    if (params_.mature == N) {
        // the fused final row follows the captured layers in the projection
        rows.mature = fuse_final_ && capture_.final_seen() ? row_proj + capture_layers_.size() * V
                                                            : llama_get_logits_ith(ctx_.get(), row);
        if (!rows.mature) throw error("llama.cpp returned no logits");
    } else {
        // early exit: the mature layer's projected row, copied (the decoder may overwrite rows)
        const size_t slot = std::find(capture_layers_.begin(), capture_layers_.end(), params_.mature) - capture_layers_.begin();
        mature_hidden_logits_.assign(row_proj + slot * V, row_proj + (slot + 1) * V);
        rows.mature = mature_hidden_logits_.data();
    }
    check_finite(rows.mature, V);
    return rows;
}

step_result session::sample(float eos_bonus) {
    if (!have_outputs_ || (context_layer() >= 0 && !context_.valid())) {
        throw error("no outputs to sample from: prefill a prompt first");
    }
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t V = model_->n_vocab();
    scores_.resize(V);
    lp_.resize(V);
    step_result res;

    // Project the captured last rows of all needed layers (and the final normed state when
    // fused) in one matmul.
    const bool fused = fuse_final_ && capture_.final_seen();
    const int32_t n_proj = (int32_t) capture_layers_.size() + (fused ? 1 : 0);
    bool on_device = false;
    double device_entropy = 0.0;
    if (n_proj > 0) {
        const int32_t E = model_->n_embd();
        hidden_.resize((size_t) n_proj * E);
        for (int32_t s = 0; s < (int32_t) capture_layers_.size(); ++s) {
            std::memcpy(hidden_.data() + (size_t) s * E, capture_.rows(s), E * sizeof(float));
        }
        if (fused) projector_->join_final(hidden_.data(), n_proj - 1, params_.premature_norm, capture_.final_row());
        // DoLa with the fused final row (the rows are exactly [candidates..., mature]) may run its
        // contrast where the projection ran and fetch two rows instead of all of them.
        if (contrast_on_device(*decoder_, fused, params_.premature_norm, capture_layers_.size())) {
            device_jsd_.resize(n_proj - 1);
            on_device = projector_->project_dola(hidden_.data(), {n_proj}, device_jsd_.data(), &device_entropy);
        }
        if (!on_device) {
            cand_logits_.resize((size_t) n_proj * V);
            projector_->project(hidden_.data(), n_proj, params_.premature_norm && !fused, cand_logits_.data());
        }
    }
    if (on_device) {
        decoder_rows rows;
        rows.n_vocab = V;
        rows.n_threads = threads_now_;
        projected_rows device(*projector_, 0);
        device.jsd = device_jsd_.data();
        device.entropy = device_entropy;
        rows.device = &device;
        decoder_->step(rows, lp_.data(), scores_.data(), res);
        check_finite(lp_.data(), V);
    } else {
        decoder_->step(rows_for(cand_logits_.data(), -1), lp_.data(), scores_.data(), res);
    }
    finish_step(sampler_, scores_.data(), lp_.data(), V, tokens_, n_prompt_, eos_bonus, params_.n_probs,
                context_layer() >= 0 ? &context_ : nullptr, chosen_lp_, res);
    timings_.contrast_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return res;
}

std::vector<float> session::layer_logits(const std::vector<llama_token> & prompt, const std::vector<int64_t> & layers,
                                         bool premature_norm, bool project_final) {
    const int32_t N = model_->n_layer();
    const int64_t V = model_->n_vocab();
    std::vector<int32_t> hidden_layers;
    for (int64_t l : layers) {
        if (l < 0 || l > N) throw error("layer " + std::to_string(l) + " is out of range: valid layers are 0.." + std::to_string(N));
        if ((l != N || project_final) && std::find(hidden_layers.begin(), hidden_layers.end(), l) == hidden_layers.end()) {
            hidden_layers.push_back((int32_t) l);
        }
    }
    if (!hidden_layers.empty() && !capture_enabled_) throw error("this context was created without layer capture");
    if (!hidden_layers.empty()) need_projector();
    if (projector_) projector_->set_n_threads(threads_now_);
    // without hidden layers nothing is projected (and there may be no projector yet)
    if (premature_norm && projector_ && !projector_->norm_supported()) {
        throw error("premature_norm is not supported for architecture '" + model_->architecture() + "'");
    }
    capture_.set_layers(hidden_layers);
    capture_.set_final(false);
    capture_override restore{*this};
    std::vector<float> out(layers.size() * V);
    clear();  // force a full decode so every row is captured from this prompt
    prefill(prompt);
    std::vector<float> proj(hidden_layers.size() * V);
    if (!hidden_layers.empty()) {
        const int32_t E = model_->n_embd();
        std::vector<float> h(hidden_layers.size() * E);
        for (size_t s = 0; s < hidden_layers.size(); ++s) std::memcpy(h.data() + s * E, capture_.rows((int32_t) s), E * sizeof(float));
        projector_->project(h.data(), (int32_t) hidden_layers.size(), premature_norm, proj.data());
    }
    for (size_t i = 0; i < layers.size(); ++i) {
        const float * src;
        if (layers[i] == N && !project_final) {
            src = llama_get_logits_ith(ctx_.get(), -1);
        } else {
            const size_t s = std::find(hidden_layers.begin(), hidden_layers.end(), layers[i]) - hidden_layers.begin();
            src = proj.data() + s * V;
        }
        std::memcpy(out.data() + i * V, src, V * sizeof(float));
    }
    return out;
}

score_result session::score(const std::vector<llama_token> & toks, size_t n_prefix, bool post_softmax,
                            double relative_top, float mask_value) {
    return std::move(score_batch({scored_text{toks, n_prefix}}, post_softmax, relative_top, mask_value)[0]);
}

std::vector<score_result> session::score_batch(const std::vector<scored_text> & texts, bool post_softmax,
                                               double relative_top, float mask_value) {
    if (texts.empty()) return {};
    for (const scored_text & t : texts) {
        check_prompt(t.tokens);
        if (t.n_prefix < 1 || t.n_prefix >= t.tokens.size()) throw error("the continuation is empty (or the prefix is)");
    }
    const int64_t V = model_->n_vocab();
    const int32_t E = model_->n_embd();
    const int32_t n_proj = (int32_t) capture_layers_.size();
    // The last token is only predicted, but Activation Decoding's H covers its position too.
    const bool context = context_layer() >= 0;
    // The prefix all texts share is decoded once, into sequence 0. When it is every text's whole
    // prefix, its last row (which predicts each text's first token) is computed once for all of
    // them; else (one text, or prefixes that differ) each text recomputes its own first row, as a
    // single score does.
    const std::vector<llama_token> & first = texts[0].tokens;
    size_t shared = first.size();
    bool same_prefix = texts.size() > 1;
    for (const scored_text & t : texts) {
        size_t k = 0;
        const size_t limit = std::min(shared, t.n_prefix);
        while (k < limit && t.tokens[k] == first[k]) ++k;
        shared = k;
        same_prefix = same_prefix && t.n_prefix == texts[0].n_prefix;
    }
    same_prefix = same_prefix && shared == texts[0].n_prefix;
    if (!same_prefix) {
        for (const scored_text & t : texts) shared = std::min(shared, t.n_prefix - 1);
    }
    capture_.set_final(false);  // several rows: the mature logits come from llama.cpp
    capture_override restore{*this};
    // a shared first row is recomputed even when cached: its outputs are needed
    const size_t common = keep_cached_prefix(first, same_prefix ? shared - 1 : shared);

    std::vector<score_result> results(texts.size());
    std::vector<float> proj, lp(V), diff(V), top_vals;
    std::vector<int32_t> top_ids;
    const score_options opt{post_softmax, relative_top, mask_value};
    // The decoder's scores of one row, appended to each text (j) that continues with its token (y)
    // there: a row the texts share is scored once for all of them.
    using targets = std::vector<std::pair<size_t, llama_token>>;
    std::vector<std::pair<int32_t, float>> top;
    auto score_row = [&](const decoder_rows & rows, const targets & to) {
        score_detail d;
        const float * s = decoder_->score(rows, opt, lp.data(), diff.data(), d);
        const float top_lp = *std::max_element(lp.begin(), lp.end());
        const float h = (float) entropy(lp.data(), V);
        if (params_.n_probs > 0) {
            top_n(lp.data(), V, params_.n_probs, top_ids, top_vals);
            top.clear();
            for (size_t k = 0; k < top_ids.size(); ++k) top.emplace_back(top_ids[k], top_vals[k]);
        }
        for (const auto & [j, y] : to) {
            score_result & res = results[j];
            res.token_scores.push_back(s[y]);
            res.premature_layers.push_back(d.layer);
            res.jsd.push_back(d.jsd);
            res.mature_logprobs.push_back(lp[y]);
            res.top_logprobs.push_back(top_lp);
            res.entropies.push_back(h);
            if (params_.n_probs > 0) res.top_tokens.push_back(top);
            res.total += s[y];
        }
    };
    // projects rows [slot][row][E] of the capture (the call's rows from row0 on) into proj, [row][slot][V]
    auto project_rows = [&](const int32_t * rows, int32_t n_rows, int32_t row0) {
        if (n_proj == 0) return;
        hidden_.resize((size_t) n_rows * n_proj * E);
        for (int32_t r = 0; r < n_rows; ++r)
            for (int32_t s = 0; s < n_proj; ++s)
                std::memcpy(hidden_.data() + ((size_t) r * n_proj + s) * E,
                            capture_.rows(s) + (size_t) (rows[r] - row0) * E, E * sizeof(float));
        proj.resize((size_t) n_rows * n_proj * V);
        projector_->project(hidden_.data(), n_rows * n_proj, params_.premature_norm, proj.data());
    };

    // A call's rows: llama.cpp's logits for them within ~128 MB. The rows' projections (K a row)
    // are made and read a few rows at a time, within ~16 MB, so they are read back from cache.
    const size_t rows_per_call = std::max<size_t>(1, std::min<size_t>(n_batch_, (size_t) (32u << 20) / (size_t) V));
    const size_t rows_per_projection = std::max<size_t>(1, (size_t) (4u << 20) / ((size_t) std::max(n_proj, 1) * V));
    llama_memory_t mem = llama_get_memory(ctx_.get());
    // The texts' own sequences (1..): whatever happens, their cells are freed on return.
    struct text_seqs {
        llama_memory_t mem;
        int32_t n = 0;
        void release() {
            for (int32_t s = 1; s <= n; ++s) llama_memory_seq_rm(mem, s, -1, -1);
            n = 0;
        }
        ~text_seqs() { release(); }
    } seqs{mem};

    for (size_t g0 = 0; g0 < texts.size();) {
        // a group: texts side by side as sequences 1..n, their tokens beside the prefix's cells
        size_t g1 = g0, cells = shared;
        while (g1 < texts.size() && (int32_t) (g1 - g0) < max_score_texts) {
            const size_t n_in = context ? texts[g1].tokens.size() : texts[g1].tokens.size() - 1;
            if (g1 > g0 && cells + n_in - shared > n_ctx_) break;
            cells += n_in - shared;
            ++g1;
        }
        seqs.n = (int32_t) (g1 - g0);
        for (int32_t s = 1; s <= seqs.n; ++s) llama_memory_seq_cp(mem, 0, s, -1, -1);
        // The group's texts as a tree: a token at the same position after the same tokens is one row
        // (and one cache cell) in the sequences of all the texts it belongs to, so answers that begin
        // alike decode and score their common beginning once. Rows are numbered as the texts meet
        // them, so each text's rows come in the order of its positions.
        struct node {
            llama_token token;
            llama_pos pos;
            std::vector<llama_seq_id> seqs;
            targets to;  // the texts whose next token this row predicts
            bool prefix;  // a token of the prefix: also the session's (sequence 0)
        };
        std::vector<node> nodes;
        if (g0 == 0) {
            // the prefix's tokens not cached, in the first calls as rows of sequence 0 and of every
            // text: one chain the texts hang from, its last row (when the texts share the whole
            // prefix) predicting every text's first token
            std::vector<llama_seq_id> all(1 + seqs.n);
            for (int32_t s = 0; s <= seqs.n; ++s) all[s] = s;
            for (size_t p = common; p < shared; ++p) nodes.push_back(node{first[p], (llama_pos) p, all, {}, true});
            if (same_prefix) {
                for (size_t j = 0; j < texts.size(); ++j) nodes.back().to.emplace_back(j, texts[j].tokens[shared]);
            }
        }
        std::map<std::pair<int32_t, llama_token>, int32_t> child;  // (parent row, token) -> row; -1: the prefix
        std::vector<std::vector<int32_t>> paths(context ? g1 - g0 : 0);
        for (size_t j = g0; j < g1; ++j) {
            const std::vector<llama_token> & toks = texts[j].tokens;
            const size_t n_in = context ? toks.size() : toks.size() - 1;
            int32_t parent = -1;
            for (size_t p = shared; p < n_in; ++p) {
                const auto [it, added] = child.try_emplace({parent, toks[p]}, (int32_t) nodes.size());
                if (added) nodes.push_back(node{toks[p], (llama_pos) p, {}, {}, false});
                node & nd = nodes[it->second];
                nd.seqs.push_back((llama_seq_id) (1 + j - g0));
                if (p + 1 >= texts[j].n_prefix && p + 1 < toks.size()) nd.to.emplace_back(j, toks[p + 1]);
                if (context) paths[j - g0].push_back(it->second);
                parent = it->second;
            }
        }
        std::vector<float> node_context(context ? nodes.size() * E : 0);
        for (size_t c0 = 0; c0 < nodes.size(); c0 += rows_per_call) {
            const int32_t n = (int32_t) std::min(rows_per_call, nodes.size() - c0);
            owned_batch b(n, 1 + seqs.n);
            llama_batch & bt = b.get();
            std::vector<int32_t> scored;  // rows of this call that predict a continuation token
            // the rows kept are one range, from the first that is not the prefix's alone (the
            // prefix's rows come first and only its last may predict a text's token)
            int32_t row0 = n, n_prefix_rows = 0;
            for (int32_t i = 0; i < n; ++i) {
                const node & nd = nodes[c0 + i];
                bt.token[i] = nd.token;
                bt.pos[i] = nd.pos;
                bt.n_seq_id[i] = (int32_t) nd.seqs.size();
                std::copy(nd.seqs.begin(), nd.seqs.end(), bt.seq_id[i]);
                if (!nd.to.empty()) scored.push_back(i);
                if (row0 == n && (!nd.prefix || !nd.to.empty())) row0 = i;
                n_prefix_rows += nd.prefix ? 1 : 0;
            }
            for (int32_t i = 0; i < n; ++i) bt.logits[i] = i >= row0;
            bt.n_tokens = n;
            decode_batch(bt, row0, n, context);
            if (context) {
                check_context_captured();
                std::memcpy(node_context.data() + c0 * E, capture_.context_rows(), (size_t) n * E * sizeof(float));
            }
            // the prefix's rows are the session's now
            if (n_prefix_rows > 0) append_decoded(first.data() + nodes[c0].pos, n_prefix_rows, context);
            timings_.n_score_rows += n - n_prefix_rows;
            if (!scored.empty()) check_layers_captured();
            for (size_t r0 = 0; r0 < scored.size(); r0 += rows_per_projection) {
                const int32_t n_rows = (int32_t) std::min(rows_per_projection, scored.size() - r0);
                const int32_t * rows = scored.data() + r0;
                project_rows(rows, n_rows, row0);
                for (int32_t r = 0; r < n_rows; ++r) {
                    score_row(rows_for(proj.data() + (size_t) r * n_proj * V, rows[r]), nodes[c0 + rows[r]].to);
                }
            }
        }
        seqs.release();
        if (context) {
            // H over every position of prefix and continuation (the reference's lm_score), then
            // each continuation token's share
            for (size_t j = g0; j < g1; ++j) {
                const std::vector<llama_token> & toks = texts[j].tokens;
                const size_t n_prefix = texts[j].n_prefix;
                std::vector<float> rows;  // the text's rows, position by position
                rows.reserve(paths[j - g0].size() * E);
                for (int32_t r : paths[j - g0]) {
                    rows.insert(rows.end(), node_context.begin() + (size_t) r * E, node_context.begin() + (size_t) (r + 1) * E);
                }
                context_.append_rows(rows.data(), (int32_t) (toks.size() - shared));
                context_.begin(n_prefix - 1, toks.size());
                std::vector<float> h(toks.size() - n_prefix);
                context_.entropy_of(toks.data() + n_prefix, (int32_t) h.size(), h.data());  // one batch
                score_result & res = results[j];
                res.total = 0.0;
                for (size_t t = 0; t < res.token_scores.size(); ++t) {
                    res.token_scores[t] += decoder_->context_score(toks[n_prefix + t], context_);
                    res.total += res.token_scores[t];
                }
                context_.truncate(shared);  // the prefix's rows again; not the H of a prompt to sample from
            }
        }
        g0 = g1;
    }
    return results;
}

}  // namespace dola
