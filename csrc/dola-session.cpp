#include "dola-session.h"

#include "dola-contrast.h"
#include "dola-error.h"
#include "dola-log.h"
#include "dola-rpc.h"

#include "llama-context.h"  // internal: the context's parameters and scheduler, to switch the callback

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>

namespace dola {

namespace {

void check_finite(const float * logits, int64_t n) {
    if (!all_finite(logits, n)) {
        throw error("the model produced non-finite logits (NaN or inf): its weights are corrupt or its activations overflow");
    }
}

int32_t checked_threads(int32_t n) {
    if (n > GGML_MAX_N_THREADS) {  // ggml's thread pool crashes beyond this
        throw error("n_threads must be at most " + std::to_string(GGML_MAX_N_THREADS) + ", got " + std::to_string(n));
    }
    return n > 0 ? n : (int32_t) std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace

session::session(std::shared_ptr<model> mdl, const context_params & params)
    : model_(std::move(mdl)),
      n_threads_(checked_threads(params.n_threads)),
      threads_now_(n_threads_),
      governor_(n_threads_, params.adaptive_threads),
      capture_(model_->n_layer(), model_->n_embd()) {
    const int32_t n_ctx_train = model_->n_ctx_train();
    n_ctx_ = params.n_ctx > 0 ? params.n_ctx : (uint32_t) std::max(n_ctx_train, 512);
    n_batch_ = std::max<uint32_t>(1, std::min(params.n_batch, n_ctx_));
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx_;
    cp.n_batch = n_batch_;
    cp.n_ubatch = n_batch_;  // one llama_decode call = one ubatch: capture rows map to batch rows
    cp.n_seq_max = 1;
    cp.n_threads = n_threads_;
    cp.n_threads_batch = n_threads_;
    capture_enabled_ = params.capture;  // the callback is installed per ubatch, when it has rows to capture
    cp.abort_callback = abort_cb;
    cp.abort_callback_data = this;
    cp.no_perf = true;
    if (params.kv_type == "f32") {
        // exact mode (reference parity): F32 cache and no flash attention, whose CPU kernel
        // rounds Q to F16
        cp.type_k = cp.type_v = GGML_TYPE_F32;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    } else if (params.kv_type == "q8_0") {
        cp.type_k = cp.type_v = GGML_TYPE_Q8_0;
    } else if (params.kv_type != "f16") {
        throw error("kv cache type must be f16, f32 or q8_0, got '" + params.kv_type + "'");
    }
    clear_last_error();
    ctx_.reset(llama_init_from_model(model_->get(), cp));
    if (!ctx_) throw error(with_detail("could not create a context of " + std::to_string(n_ctx_) + " tokens"));
    n_ctx_ = llama_n_ctx(ctx_.get());
    last_check_ = std::chrono::steady_clock::now();
}

session::~session() {
    if (model_->rpc_lost()) {  // freeing would talk to a dead server
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

void session::configure(const decode_params & p) {
    const int32_t N = model_->n_layer();
    const int32_t mature = p.mature < 0 ? N : p.mature;
    if (mature < 1 || mature > N) {
        throw error("mature layer " + std::to_string(mature) + " is out of range: valid layers are 1.." + std::to_string(N));
    }
    for (int32_t l : p.candidates) {
        if (l < 0 || l >= N) {
            throw error("premature layer " + std::to_string(l) + " is out of range: valid layers are 0.." + std::to_string(N - 1));
        }
        if (l == mature) throw error("premature layer " + std::to_string(l) + " is the mature layer");
    }
    if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty)) throw error("repetition_penalty must be > 0");
    if (!(p.relative_top >= 0.0 && p.relative_top < 1.0)) throw error("relative_top must be in [0, 1)");
    if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) throw error("temperature must be >= 0");
    if (p.top_k < 0) throw error("top_k must be >= 0");
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) throw error("top_p must be in (0, 1]");
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) throw error("min_p must be in [0, 1]");
    if (!(p.dry_multiplier >= 0.0f) || !std::isfinite(p.dry_multiplier)) throw error("dry_multiplier must be >= 0");
    if (!(p.dry_base >= 1.0f) || !std::isfinite(p.dry_base)) throw error("dry_base must be >= 1");
    if (p.dry_allowed_length < 0) throw error("dry_allowed_length must be >= 0");
    if (p.dry_penalty_last_n < -1) throw error("dry_penalty_last_n must be >= -1 (-1 = the whole context)");
    for (const std::string & b : p.dry_sequence_breakers) {
        // llama.cpp skips empty ones and truncates long ones; a NUL would cut the C string it reads
        if (b.empty() || b.size() > 40 || b.find('\0') != std::string::npos) {
            throw error("each DRY sequence breaker must be 1 to 40 bytes of text without NUL");
        }
    }
    if (p.activation) {
        if (p.info_layer < 0 || p.info_layer >= N) {
            throw error("info_layer " + std::to_string(p.info_layer) + " is out of range: valid layers are 0.." + std::to_string(N - 1));
        }
        if (!(p.alpha >= 0.0f) || !std::isfinite(p.alpha)) throw error("alpha must be a finite number >= 0");
    }

    std::unique_ptr<decoder> dec = make_decoder(p);
    // the decoder's layers, then the mature layer when it is an early exit
    std::vector<int32_t> layers = dec->layers();
    if (mature != N && std::find(layers.begin(), layers.end(), mature) == layers.end()) layers.push_back(mature);
    const int32_t ctx_layer = dec->context_layer();
    if ((!layers.empty() || ctx_layer >= 0) && !capture_enabled_) {
        throw error("this context was created without layer capture; DoLa, Activation Decoding and early exit need it");
    }
    if (!layers.empty() || ctx_layer >= 0) {
        if (!projector_) projector_ = std::make_unique<projector>(model_->get());
        projector_->set_n_threads(threads_now_);
        if (p.premature_norm && !projector_->norm_supported()) {
            throw error("premature_norm is not supported for architecture '" + model_->architecture() + "'");
        }
    }
    // With projected layers and the final layer as mature, the logits come from the same
    // projection as the projected rows: one pass over the output matrix instead of two.
    static const bool no_fuse = std::getenv("DOLA_CPP_NO_FUSE") != nullptr;
    const bool fuse = !dec->layers().empty() && mature == N && !p.premature_norm && !no_fuse && projector_ &&
                      projector_->can_fuse_final();
    if (layers != capture_layers_ || fuse != fuse_final_) have_outputs_ = false;
    capture_layers_ = layers;
    fuse_final_ = fuse;
    capture_.set_layers(layers);
    capture_.set_final(fuse);
    // The stored context rows are one layer's; the entropy statistics also depend on the norm.
    if (ctx_layer >= 0 && ctx_layer != context_rows_layer_) {
        context_len_ = 0;
        ckpts_.clear();
        context_rows_layer_ = ctx_layer;
    }
    if (p.premature_norm != ckpt_norm_) ckpts_.clear();
    if (ctx_layer >= 0 && (context_layer() != ctx_layer || p.premature_norm != ckpt_norm_)) {
        context_H_valid_ = false;  // H of another layer or projection: prefill again
        have_outputs_ = false;
    }
    ckpt_norm_ = p.premature_norm;
    capture_.set_context_layer(ctx_layer);
    decoder_ = std::move(dec);

    params_ = p;
    params_.mature = mature;
    dry_.reset();
    dry_last_n_ = p.dry_penalty_last_n < 0 ? n_ctx_ : (size_t) p.dry_penalty_last_n;
    if (p.dry_multiplier > 0.0f && dry_last_n_ > 0) {
        std::vector<const char *> breakers;
        for (const std::string & b : p.dry_sequence_breakers) breakers.push_back(b.c_str());
        dry_.reset(llama_sampler_init_dry(llama_model_get_vocab(model_->get()), p.dry_multiplier, p.dry_base,
                                          p.dry_allowed_length, (int32_t) dry_last_n_, breakers.data(), breakers.size()));
    }
    chain_.reset();
    if (p.temperature > 0.0f) {
        // transformers' order: temperature, then top-k, top-p, min-p on the tempered scores.
        chain_.reset(llama_sampler_chain_init(llama_sampler_chain_default_params()));
        llama_sampler_chain_add(chain_.get(), llama_sampler_init_temp(p.temperature));
        if (p.top_k > 0) llama_sampler_chain_add(chain_.get(), llama_sampler_init_top_k(p.top_k));
        if (p.top_p < 1.0f) llama_sampler_chain_add(chain_.get(), llama_sampler_init_top_p(p.top_p, 1));
        if (p.min_p > 0.0f) llama_sampler_chain_add(chain_.get(), llama_sampler_init_min_p(p.min_p, 1));
        llama_sampler_chain_add(chain_.get(), llama_sampler_init_dist(p.seed));
    }
}

void session::validate_tokens(const std::vector<llama_token> & toks) const {
    if (toks.empty()) throw error("the prompt is empty");
    const int32_t nv = model_->n_vocab();
    for (size_t i = 0; i < toks.size(); ++i) {
        if (toks[i] < 0 || toks[i] >= nv) {
            throw error("token id " + std::to_string(toks[i]) + " at position " + std::to_string(i) +
                        " is outside the vocabulary (0.." + std::to_string(nv - 1) + ")");
        }
    }
    if (toks.size() > n_ctx_) {
        throw error("the prompt has " + std::to_string(toks.size()) + " tokens but the context holds " +
                    std::to_string(n_ctx_) + "; create the model with a larger n_ctx or shorten the prompt");
    }
}

void session::sync_cache_after_failure() {
    llama_memory_t mem = llama_get_memory(ctx_.get());
    const llama_pos pos_max = llama_memory_seq_pos_max(mem, 0);
    const size_t kept = pos_max < 0 ? 0 : std::min(tokens_.size(), (size_t) pos_max + 1);
    tokens_.resize(kept);
    context_len_ = std::min(context_len_, kept);
    ckpts_.erase(std::remove_if(ckpts_.begin(), ckpts_.end(), [&](const checkpoint & c) { return c.len > kept; }),
                 ckpts_.end());
    context_H_valid_ = false;
    have_outputs_ = false;
}

void session::update_threads() {
    const int32_t n = governor_.threads();
    if (n == threads_now_) return;
    threads_now_ = n;
    llama_set_n_threads(ctx_.get(), n, n);
    if (projector_) projector_->set_n_threads(n);
}

void session::set_capture_callback(bool on) {
    if (on == callback_on_) return;
    // llama.cpp installs cparams.cb_eval in its scheduler when it builds a graph, and keeps the
    // scheduler's callback when it reuses one: set both.
    auto & cp = const_cast<llama_cparams &>(ctx_->get_cparams());
    cp.cb_eval = on ? layer_capture::callback : nullptr;
    cp.cb_eval_user_data = on ? &capture_ : nullptr;
    ggml_backend_sched_set_eval_callback(ctx_->get_sched(), cp.cb_eval, cp.cb_eval_user_data);
    callback_on_ = on;
}

void session::decode_chunk(const llama_token * toks, int32_t n, int32_t row_begin, int32_t row_end, bool context) {
    context = context && context_layer() >= 0;
    capture_.expect(n, row_begin, row_end, context);
    const bool outputs = capture_enabled_ && capture_.outputs_mode();
    // new layers to keep as graph outputs: llama.cpp must reserve and rebuild its graphs (this
    // setter, with a value that changes nothing else, is how it asks itself for that)
    if (outputs && capture_.take_new_marks()) ctx_->set_embeddings_layer_inp(0, false);
    set_capture_callback(capture_enabled_ && capture_.needs_callback());
    update_threads();
    llama_batch batch = llama_batch_init(n, 0, 1);
    const llama_pos pos0 = (llama_pos) tokens_.size();
    for (int32_t i = 0; i < n; ++i) {
        batch.token[i] = toks[i];
        batch.pos[i] = pos0 + i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = i >= row_begin && i < row_end;
    }
    batch.n_tokens = n;
    clear_last_error();
    int32_t rc;
    if (outputs) {
        layer_capture::building marks(capture_);
        rc = llama_decode(ctx_.get(), batch);
        if (rc == 0) capture_.collect(ctx_->get_sched());
    } else {
        rc = llama_decode(ctx_.get(), batch);
    }
    llama_batch_free(batch);
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
    if (context) {
        if (!capture_.context_seen()) {
            have_outputs_ = false;
            throw error("architecture '" + model_->architecture() + "' does not expose the output of layer " +
                        std::to_string(context_layer()) + " at every position; Activation Decoding cannot use it");
        }
        if (context_len_ == tokens_.size()) append_context_rows(n);
    }
    tokens_.insert(tokens_.end(), toks, toks + n);
    if (row_end > row_begin && !capture_.layers().empty() && !capture_.complete()) {
        have_outputs_ = false;
        if (capture_.type_error()) throw error("a captured layer output is not an F32 [n_embd, n_tokens] tensor");
        throw error("architecture '" + model_->architecture() + "' does not expose layer outputs for layers " +
                    capture_.missing_layers() + " in its llama.cpp graph; DoLa cannot run on it");
    }
}

void session::clear() {
    llama_memory_clear(llama_get_memory(ctx_.get()), true);
    tokens_.clear();
    have_outputs_ = false;
    context_len_ = 0;
    ckpts_.clear();
    context_H_valid_ = false;
}

void session::append_context_rows(int32_t n) {
    const size_t E = (size_t) model_->n_embd();
    context_hidden_.resize((context_len_ + n) * E);
    std::memcpy(context_hidden_.data() + context_len_ * E, capture_.context_rows(), n * E * sizeof(float));
    context_len_ += n;
}

void session::add_context_rows(position_entropy & acc, size_t from, size_t to) {
    const int64_t V = model_->n_vocab();
    const int32_t E = model_->n_embd();
    // Project at most 64 positions (and 64 MB of logits) at a time: memory stays O(n_vocab).
    const size_t chunk = std::max<size_t>(1, std::min<size_t>(64, (size_t) (16u << 20) / (size_t) V));
    for (size_t p = from; p < to; p += chunk) {
        const int32_t n = (int32_t) std::min(chunk, to - p);
        context_proj_.resize((size_t) n * V);
        projector_->project(context_hidden_.data() + p * E, n, params_.premature_norm, context_proj_.data());
        acc.add(context_proj_.data(), n, threads_now_);
    }
}

void session::context_begin(size_t boundary, size_t end) {
    if (end > context_len_ || boundary > end) throw error("internal: context rows missing for Activation Decoding");
    context_boundary_ = boundary;
    context_end_ = end;
    context_H_.assign(model_->n_vocab(), std::numeric_limits<float>::quiet_NaN());
    context_H_all_ = false;
    context_H_valid_ = true;
    context_normed_.clear();
}

void session::context_entropy_of(const int32_t * ids, int32_t n, float * out) {
    if (!context_H_valid_) throw error("internal: no context for Activation Decoding");
    context_missing_.clear();
    for (int32_t i = 0; i < n; ++i) {
        if (std::isnan(context_H_[ids[i]])) context_missing_.push_back(ids[i]);
    }
    // a scored continuation may repeat a token; sort+unique, not a search per id (sets reach V/16)
    std::sort(context_missing_.begin(), context_missing_.end());
    context_missing_.erase(std::unique(context_missing_.begin(), context_missing_.end()), context_missing_.end());
    if (!context_missing_.empty()) {
        const int32_t m = (int32_t) context_missing_.size();
        const int32_t E = model_->n_embd();
        context_w_.resize((size_t) m * E);
        if (!projector_->output_rows(context_missing_.data(), m, context_w_.data())) {
            context_entropy_all();  // the output matrix is not readable here: project everything
        } else {
            const float * hidden = context_hidden_.data();
            if (params_.premature_norm) {  // normed once per context
                if (context_normed_.size() != context_end_ * E) {
                    context_normed_.resize(context_end_ * E);
                    projector_->normalize(hidden, (int32_t) context_end_, context_normed_.data());
                }
                hidden = context_normed_.data();
            }
            std::vector<float> h(m);
            entropy_of_rows(hidden, (int64_t) context_end_, context_w_.data(), m, E, h.data(), threads_now_);
            for (int32_t k = 0; k < m; ++k) context_H_[context_missing_[k]] = h[k];
        }
    }
    for (int32_t i = 0; i < n; ++i) out[i] = context_H_[ids[i]];
}

const float * session::context_entropy_all() {
    if (!context_H_valid_) throw error("internal: no context for Activation Decoding");
    if (context_H_all_) return context_H_.data();
    const int64_t V = model_->n_vocab();
    const size_t boundary = context_boundary_, end = context_end_;
    // start from the longest checkpoint of this sequence's prefix (all kept ones are: a
    // checkpoint past the kept cache is dropped with it)
    position_entropy acc;
    size_t pos = 0, best = ckpts_.size();
    for (size_t i = 0; i < ckpts_.size(); ++i) {
        if (ckpts_[i].len <= end && ckpts_[i].len > pos) {
            pos = ckpts_[i].len;
            best = i;
        }
    }
    if (best < ckpts_.size()) {
        acc = ckpts_[best].stats;
        std::rotate(ckpts_.begin() + best, ckpts_.begin() + best + 1, ckpts_.end());  // most recently used last
    } else {
        acc.reset(V);
    }
    for (size_t mark : {context_common_, boundary}) {
        if (mark <= pos || mark > end) continue;
        add_context_rows(acc, pos, mark);
        pos = mark;
        if (ckpts_.size() >= 3) ckpts_.erase(ckpts_.begin());
        ckpts_.push_back({mark, acc});
    }
    add_context_rows(acc, pos, end);
    acc.entropy(context_H_.data());
    context_H_all_ = true;
    return context_H_.data();
}

size_t session::keep_cached_prefix(const std::vector<llama_token> & toks, size_t max_keep) {
    if (context_layer() >= 0) max_keep = std::min(max_keep, context_len_);  // rows to rebuild H from
    size_t common = 0;
    const size_t limit = std::min({tokens_.size(), toks.size(), max_keep});
    while (common < limit && tokens_[common] == toks[common]) ++common;
    if (common < tokens_.size()) {
        if (!llama_memory_seq_rm(llama_get_memory(ctx_.get()), 0, (llama_pos) common, -1)) {
            clear();  // memories that cannot drop a suffix (recurrent) start over
            common = 0;
        }
        tokens_.resize(common);
    }
    context_len_ = std::min(context_len_, common);
    context_common_ = common;
    ckpts_.erase(std::remove_if(ckpts_.begin(), ckpts_.end(), [&](const checkpoint & c) { return c.len > common; }),
                 ckpts_.end());
    context_H_valid_ = false;
    have_outputs_ = false;
    return common;
}

void session::prefill(const std::vector<llama_token> & prompt) {
    validate_tokens(prompt);
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
    if (context_layer() >= 0) context_begin(prompt.size() - 1, prompt.size());
    have_outputs_ = true;
    timings_.prefill_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    timings_.n_prefill += (int64_t) (prompt.size() - common);
}

void session::accept(llama_token token) {
    const int32_t nv = model_->n_vocab();
    if (token < 0 || token >= nv) throw error("token id " + std::to_string(token) + " is outside the vocabulary");
    if (tokens_.size() >= n_ctx_) throw error("the context is full (" + std::to_string(n_ctx_) + " tokens)");
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
    rows.context = context_H_valid_ ? &context_source_ : nullptr;
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
    if (!have_outputs_ || (context_layer() >= 0 && !context_H_valid_)) {
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
    if (n_proj > 0) {
        const int32_t E = model_->n_embd();
        hidden_.resize((size_t) n_proj * E);
        for (int32_t s = 0; s < (int32_t) capture_layers_.size(); ++s) {
            std::memcpy(hidden_.data() + (size_t) s * E, capture_.rows(s), E * sizeof(float));
        }
        if (fused) std::memcpy(hidden_.data() + (size_t) (n_proj - 1) * E, capture_.final_row(), E * sizeof(float));
        // DoLa with the fused final row (the rows are exactly [candidates..., mature]) may run its
        // contrast where the projection ran and fetch two rows instead of all of them.
        if (fused && !params_.premature_norm && decoder_->wants_device_rows() &&
            (int32_t) decoder_->layers().size() == n_proj - 1) {
            device_jsd_.resize(n_proj - 1);
            on_device = projector_->project_dola(hidden_.data(), n_proj, device_jsd_.data(), &device_rows_.entropy);
        }
        if (!on_device) {
            cand_logits_.resize((size_t) n_proj * V);
            projector_->project(hidden_.data(), n_proj, params_.premature_norm, cand_logits_.data());
        }
    }
    if (on_device) {
        decoder_rows rows;
        rows.n_vocab = V;
        rows.n_threads = threads_now_;
        device_rows_.jsd = device_jsd_.data();
        rows.device = &device_rows_;
        decoder_->step(rows, lp_.data(), scores_.data(), res);
        check_finite(lp_.data(), V);
    } else {
        decoder_->step(rows_for(cand_logits_.data(), -1), lp_.data(), scores_.data(), res);
    }
    repetition_penalty(scores_.data(), V, tokens_.data(), (int64_t) tokens_.size(), params_.repetition_penalty);
    if (dry_) apply_dry();
    res.top_logprob = *std::max_element(lp_.begin(), lp_.end());
    if (eos_bonus != 0.0f) boost_eog(eos_bonus, res.top_logprob);

    llama_token tok = 0;
    if (!chain_) {
        float best = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < V; ++i) {
            if (scores_[i] > best) {
                best = scores_[i];
                tok = (llama_token) i;
            }
        }
    } else {
        cur_.resize(V);
        for (int64_t i = 0; i < V; ++i) cur_[i] = {(llama_token) i, scores_[i], 0.0f};
        llama_token_data_array arr = {cur_.data(), (size_t) V, -1, false};
        llama_sampler_apply(chain_.get(), &arr);
        if (arr.selected < 0 || arr.selected >= (int64_t) arr.size) throw error("the sampler selected no token");
        tok = arr.data[arr.selected].id;
    }
    res.token = tok;
    res.mature_logprob = lp_[tok];
    res.score = scores_[tok];
    if (context_layer() >= 0) context_entropy_of(&tok, 1, &res.activation_entropy);
    timings_.contrast_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return res;
}

// DRY only lowers tokens of the scanned window (those that would extend one of its repeats), so
// it runs on those tokens alone instead of the whole vocabulary, with the window as its history.
void session::apply_dry() {
    const size_t n = tokens_.size();
    const size_t from = n > dry_last_n_ ? n - dry_last_n_ : 0;
    llama_sampler_reset(dry_.get());
    dry_ids_.assign(tokens_.begin() + (std::ptrdiff_t) from, tokens_.end());
    for (llama_token t : dry_ids_) llama_sampler_accept(dry_.get(), t);
    std::sort(dry_ids_.begin(), dry_ids_.end());
    dry_ids_.erase(std::unique(dry_ids_.begin(), dry_ids_.end()), dry_ids_.end());
    if (dry_ids_.empty()) return;
    cur_.resize(dry_ids_.size());
    for (size_t i = 0; i < dry_ids_.size(); ++i) cur_[i] = {dry_ids_[i], scores_[dry_ids_[i]], 0.0f};
    llama_token_data_array arr = {cur_.data(), cur_.size(), -1, false};
    llama_sampler_apply(dry_.get(), &arr);
    for (size_t i = 0; i < arr.size; ++i) scores_[arr.data[i].id] = arr.data[i].logit;
}

void session::boost_eog(float bonus, float top_logprob) {
    const float ninf = -std::numeric_limits<float>::infinity();
    const float best = *std::max_element(scores_.begin(), scores_.end());
    for (llama_token e : model_->eog_tokens()) {
        float & s = scores_[e];
        if (s == ninf) s = best + (lp_[e] - top_logprob);
        if (s != ninf) s += bonus;
    }
}

std::vector<float> session::layer_logits(const std::vector<llama_token> & prompt, const std::vector<int32_t> & layers,
                                         bool premature_norm, bool project_final) {
    const int32_t N = model_->n_layer();
    const int64_t V = model_->n_vocab();
    std::vector<int32_t> hidden_layers;
    for (int32_t l : layers) {
        if (l < 0 || l > N) throw error("layer " + std::to_string(l) + " is out of range: valid layers are 0.." + std::to_string(N));
        if ((l != N || project_final) && std::find(hidden_layers.begin(), hidden_layers.end(), l) == hidden_layers.end()) {
            hidden_layers.push_back(l);
        }
    }
    if (!hidden_layers.empty() && !capture_enabled_) throw error("this context was created without layer capture");
    if (!hidden_layers.empty() && !projector_) projector_ = std::make_unique<projector>(model_->get());
    if (projector_) projector_->set_n_threads(threads_now_);
    if (premature_norm && !projector_->norm_supported()) {
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
    validate_tokens(toks);
    if (n_prefix < 1 || n_prefix >= toks.size()) throw error("the continuation is empty (or the prefix is)");
    const int64_t V = model_->n_vocab();
    const int32_t N = model_->n_layer();
    const int32_t E = model_->n_embd();
    const int32_t n_proj = (int32_t) capture_layers_.size();
    const size_t first_row = n_prefix - 1;   // position whose output predicts toks[n_prefix]
    // The last token is only predicted, but Activation Decoding's H covers its position too.
    const bool context = context_layer() >= 0;
    const size_t n_in = context ? toks.size() : toks.size() - 1;
    const size_t n_out_end = toks.size() - 1;  // rows [first_row, n_out_end) give outputs
    score_result res;

    // Reuse the cached prefix, but never past first_row (its row must be recomputed).
    const size_t common = keep_cached_prefix(toks, first_row);
    capture_.set_final(false);  // several rows: the mature logits come from llama.cpp
    capture_override restore{*this};

    // Rows with outputs are projected K at a time per row; bound the scratch to ~128 MB.
    const size_t rows_per_chunk = std::max<size_t>(1, std::min<size_t>(n_batch_, (size_t) (32u << 20) / ((size_t) std::max(n_proj, 1) * V)));
    std::vector<float> proj, lp(V), diff(V);
    const score_options opt{post_softmax, relative_top, mask_value};
    for (size_t i = common; i < n_in;) {
        // prefix chunks carry no outputs; answer chunks output every row
        const size_t n = i < first_row ? std::min<size_t>(n_batch_, first_row - i)
                                       : std::min<size_t>(std::min<size_t>(n_batch_, rows_per_chunk), n_in - i);
        const int32_t n_rows = i < first_row ? 0 : (int32_t) (std::min(i + n, n_out_end) - i);
        decode_chunk(toks.data() + i, (int32_t) n, 0, n_rows, true);
        if (n_rows > 0) {
            if (n_proj > 0) {
                // hidden rows ordered [row][slot] so each row's candidates are contiguous
                hidden_.resize((size_t) n_rows * n_proj * E);
                for (int32_t r = 0; r < n_rows; ++r)
                    for (int32_t s = 0; s < n_proj; ++s)
                        std::memcpy(hidden_.data() + ((size_t) r * n_proj + s) * E, capture_.rows(s) + (size_t) r * E, E * sizeof(float));
                proj.resize((size_t) n_rows * n_proj * V);
                projector_->project(hidden_.data(), n_rows * n_proj, params_.premature_norm, proj.data());
            }
            for (int32_t r = 0; r < n_rows; ++r) {
                const llama_token y = toks[i + r + 1];
                score_detail d;
                const float s = decoder_->score(rows_for(proj.data() + (size_t) r * n_proj * V, r), y, opt, lp.data(),
                                                diff.data(), d);
                res.token_scores.push_back(s);
                res.premature_layers.push_back(d.layer);
                res.jsd.push_back(d.jsd);
                res.mature_logprobs.push_back(lp[y]);
                res.top_logprobs.push_back(*std::max_element(lp.begin(), lp.end()));
                res.entropies.push_back((float) entropy(lp.data(), V));
                res.total += s;
            }
        }
        i += n;
    }
    if (context) {
        // H over every position of prefix and continuation (the reference's lm_score), then each
        // continuation token's share
        context_begin(first_row, toks.size());
        std::vector<float> h(toks.size() - n_prefix);
        context_entropy_of(toks.data() + n_prefix, (int32_t) h.size(), h.data());  // one batch
        res.total = 0.0;
        for (size_t t = 0; t < res.token_scores.size(); ++t) {
            res.token_scores[t] += decoder_->context_score(toks[n_prefix + t], context_source_);
            res.total += res.token_scores[t];
        }
        context_H_valid_ = false;  // not the H of a prompt to sample from
    }
    return res;
}

}  // namespace dola
