#include "dola-batch.h"

#include "dola-contrast.h"
#include "dola-error.h"
#include "dola-log.h"
#include "dola-step.h"

#include "llama-context.h"  // internal: the scheduler, to read the kept layers

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>

namespace dola {

namespace {

using clock_type = std::chrono::steady_clock;

double ms_since(clock_type::time_point t0) {
    return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

}  // namespace

batch_engine::batch_engine(std::shared_ptr<model> mdl, const context_params & params, int32_t n_seq, size_t cache_bytes)
    : model_(std::move(mdl)),
      env_(params.env),
      n_seq_(n_seq),
      n_threads_(checked_threads(params.n_threads)),
      governor_(n_threads_, params.adaptive_threads),
      threads_now_(n_threads_),
      capture_enabled_(params.capture),
      capture_(model_->n_layer(), model_->n_embd(), env_.capture_callback) {
    if (n_seq < 1 || n_seq > 256) throw error("the number of sequences must be in 1..256, got " + std::to_string(n_seq));
    if (model_->uses_rpc()) throw error("batched decoding does not run on RPC-backed models yet");
    n_ctx_seq_ = params.n_ctx > 0 ? params.n_ctx : (uint32_t) std::max(model_->n_ctx_train(), 512);
    const uint64_t total = (uint64_t) n_ctx_seq_ * (uint64_t) n_seq;
    if (total > (uint64_t) INT32_MAX) throw error("n_ctx times the number of sequences is too large");
    n_batch_ = std::max<uint32_t>((uint32_t) n_seq, std::min<uint32_t>(params.n_batch, (uint32_t) total));
    llama_context_params cp = context_params_for((uint32_t) total, n_batch_, n_threads_, params.kv_type, abort_cb, this);
    cp.n_seq_max = (uint32_t) n_seq;
    cp.kv_unified = false;  // a KV stream per sequence: its cells keep their order, as alone
    clear_last_error();
    ctx_.reset(llama_init_from_model(model_->get(), cp));
    if (!ctx_) throw error(with_detail("could not create a context of " + std::to_string(total) + " tokens"));
    slots_.resize(n_seq);
    const llama_model * lm = model_->get();
    if (!llama_model_is_recurrent(lm) && !llama_model_is_hybrid(lm) && llama_model_n_swa(lm) == 0) {
        cache_limit_ = cache_bytes;
    }
    thread_ = std::thread([this] { loop(); });
}

batch_engine::~batch_engine() {
    {
        std::lock_guard<std::mutex> lock(mu_);
        stop_.store(true);
    }
    work_cv_.notify_all();
    if (thread_.joinable()) thread_.join();
}

void batch_engine::update_threads() {
    const int32_t n = governor_.threads();
    if (n == threads_now_) return;
    threads_now_ = n;
    llama_set_n_threads(ctx_.get(), n, n);
    for (slot & sl : slots_) {
        if (sl.context) sl.context->set_n_threads(n);
    }
}

bool batch_engine::abort_cb(void * data) { return static_cast<batch_engine *>(data)->abort_requested(); }

projector & batch_engine::need_projector() {
    if (!projector_) {
        projector_ = std::make_unique<projector>(model_->get(), env_);
    }
    return *projector_;
}

void batch_engine::check_prompt(const std::vector<llama_token> & prompt) const {
    if (prompt.empty()) throw error("the prompt is empty");
    for (llama_token t : prompt) model_->check_token(t);
    if (prompt.size() > n_ctx_seq_) throw prompt_too_long(prompt.size(), n_ctx_seq_);
}

int64_t batch_engine::submit(batch_request req) {
    check_prompt(req.prompt);
    auto j = std::make_unique<job>();
    j->answer = std::make_unique<answer_text>(*model_, req.answer, req.prompt.size(), n_ctx_seq_);
    j->mature = check_decode_params(*model_, req.params);
    j->dec = make_decoder(req.params);
    j->layers = j->dec->layers();
    if (j->mature != model_->n_layer() && std::find(j->layers.begin(), j->layers.end(), j->mature) == j->layers.end()) {
        j->layers.push_back(j->mature);
    }
    j->ctx_layer = j->dec->context_layer();
    const bool projects = !j->layers.empty() || j->ctx_layer >= 0;
    if (projects && !capture_enabled_) {
        throw error("this context was created without layer capture; DoLa, Activation Decoding and early exit need it");
    }
    j->smp = std::make_unique<sampler>(model_->vocab(), model_->n_vocab(), model_->eog_tokens());
    j->smp->configure(req.params, n_ctx_seq_);
    j->req = std::move(req);
    std::lock_guard<std::mutex> lock(mu_);
    if (projects) {
        need_projector();
        if (j->req.params.premature_norm && !projector_->norm_supported()) {
            throw error("premature_norm is not supported for architecture '" + model_->architecture() + "'");
        }
    } else if (!projector_) {
        projector_ = plain_final_projector(*j->dec, j->mature, *model_, env_, capture_enabled_);
    }
    j->fuses = fuses_final(*j->dec, j->mature, *model_, env_, projector_.get());
    const int64_t id = next_id_++;
    j->id = id;
    queue_.push_back(j.get());
    jobs_[id] = std::move(j);
    work_cv_.notify_all();
    return id;
}

bool batch_engine::next(int64_t id, batch_event & out, int32_t timeout_ms) {
    std::unique_lock<std::mutex> lock(mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end() || it->second->released) throw error("no such request: " + std::to_string(id));
    job & j = *it->second;
    if (j.events.empty()) {
        event_cv_.wait_for(lock, std::chrono::milliseconds(std::max(0, timeout_ms)), [&] { return !j.events.empty(); });
        if (j.events.empty()) return false;
    }
    out = std::move(j.events.front());
    j.events.pop_front();
    return true;
}

void batch_engine::release(int64_t id) {
    {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = jobs_.find(id);
        if (it == jobs_.end()) return;
        job & j = *it->second;
        j.released = true;
        auto q = std::find(queue_.begin(), queue_.end(), &j);
        if (q != queue_.end()) {  // never started: nothing of it is on the engine thread
            queue_.erase(q);
            jobs_.erase(it);
            return;
        }
    }
    work_cv_.notify_all();
}

batch_stats batch_engine::stats() {
    std::lock_guard<std::mutex> lock(mu_);
    batch_stats s = stats_;
    s.n_queued = (int32_t) queue_.size();
    s.n_running = (int32_t) std::count_if(slots_.begin(), slots_.end(), [](const slot & sl) { return sl.active != nullptr; });
    s.cache_bytes = (int64_t) cache_bytes_;
    s.cache_entries = (int32_t) cache_.size();
    return s;
}

void batch_engine::emit(job & j, batch_event ev) {
    emitted_.emplace_back(&j, std::move(ev));
}

void batch_engine::fail(job & j, const std::string & why) {
    if (j.finished) return;
    batch_event ev;
    ev.kind = batch_event::failed;
    ev.error = why;
    emit(j, std::move(ev));
    j.finished = true;
}

namespace {

size_t common_prefix(const std::vector<llama_token> & a, const std::vector<llama_token> & b, size_t limit) {
    size_t c = 0;
    limit = std::min({limit, a.size(), b.size()});
    while (c < limit && a[c] == b[c]) ++c;
    return c;
}

}  // namespace

batch_engine::cache_entry batch_engine::best_cached(const std::vector<llama_token> & prompt, size_t max_len,
                                                    size_t & common) {
    cache_entry best = cache_.end();
    common = 0;
    for (auto it = cache_.begin(); it != cache_.end(); ++it) {
        const size_t c = common_prefix(it->tokens, prompt, max_len);
        if (c > common) {
            best = it;
            common = c;
        }
    }
    return best;
}

void batch_engine::save_prompt(int32_t s) {
    const std::vector<llama_token> & toks = slots_[s].tokens;
    if (cache_limit_ == 0 || toks.empty()) return;
    auto holds = [&](const cached_prompt & e) {  // e's tokens start with all of toks
        return e.tokens.size() >= toks.size() && std::equal(toks.begin(), toks.end(), e.tokens.begin());
    };
    for (auto it = cache_.begin(); it != cache_.end(); ++it) {
        if (holds(*it)) {
            cache_.splice(cache_.begin(), cache_, it);
            return;
        }
    }
    const size_t size = llama_state_seq_get_size(ctx_.get(), s);
    if (size == 0 || size + toks.size() * sizeof(llama_token) > cache_limit_) return;  // too large to keep
    cached_prompt e;
    e.tokens = toks;
    e.state.resize(size);
    if (llama_state_seq_get_data(ctx_.get(), e.state.data(), size, s) != size) return;
    for (auto it = cache_.begin(); it != cache_.end();) {  // entries these tokens extend are spent
        if (it->tokens.size() <= toks.size() && std::equal(it->tokens.begin(), it->tokens.end(), toks.begin())) {
            cache_bytes_ -= entry_bytes(*it);
            it = cache_.erase(it);
        } else {
            ++it;
        }
    }
    cache_bytes_ += entry_bytes(e);
    cache_.push_front(std::move(e));
    trim_cache();
}

void batch_engine::trim_cache() {
    while (cache_bytes_ > cache_limit_ && !cache_.empty()) {
        cache_bytes_ -= entry_bytes(cache_.back());
        cache_.pop_back();
    }
}

void batch_engine::admit(job & j, int32_t s, cache_entry entry) {
    slot & sl = slots_[s];
    sl.active = &j;
    sl.last_admit = ++n_admitted_;
    j.slot = s;
    const std::vector<llama_token> & prompt = j.req.prompt;
    if (j.ctx_layer >= 0) {
        if (!sl.context) {
            sl.context = std::make_unique<context_entropy>(model_->n_embd(), model_->n_vocab());
            sl.context->set_projector(projector_.get());
            sl.context->set_n_threads(threads_now_);
        }
        sl.context->configure(j.ctx_layer, j.req.params.premature_norm);
    }
    // keep the longest cached prefix, but always decode the prompt's last token (its output)
    size_t max_keep = prompt.size() - 1;
    if (j.ctx_layer >= 0) max_keep = std::min(max_keep, sl.context->n_rows());  // rows to rebuild H from
    const bool from_cache = entry != cache_.end();
    std::list<cached_prompt> taken;  // the entry, out of the cache while the sequence's cells are saved
    if (from_cache) {
        taken.splice(taken.begin(), cache_, entry);
        cache_bytes_ -= entry_bytes(taken.front());
    }
    // what the request does not keep of the sequence goes to the prompt cache first
    if (from_cache || common_prefix(sl.tokens, prompt, max_keep) < sl.tokens.size()) save_prompt(s);
    if (from_cache) {
        const cached_prompt & e = taken.front();
        if (llama_state_seq_set_data(ctx_.get(), e.state.data(), e.state.size(), s) == 0) {
            llama_memory_seq_rm(llama_get_memory(ctx_.get()), s, -1, -1);
            sl.tokens.clear();
        } else {
            sl.tokens = e.tokens;
        }
        if (sl.context) sl.context->keep_prefix(0);  // its rows were of the tokens replaced
        cache_bytes_ += entry_bytes(e);
        cache_.splice(cache_.begin(), taken);
        trim_cache();
    }
    const size_t common = keep_common_prefix(ctx_.get(), s, sl.tokens, prompt, max_keep);
    if (sl.context) sl.context->keep_prefix(common);
    if (from_cache && common > 0) {
        stats_.n_cache_hits += 1;
        stats_.n_cache_tokens += (int64_t) common;
    }
    j.n_prompt_done = common;
}

void batch_engine::loop() {
    std::vector<job *> work;
    while (true) {
        {
            std::unique_lock<std::mutex> lock(mu_);
            for (auto it = jobs_.begin(); it != jobs_.end();) {
                job & j = *it->second;
                if (j.released) {
                    if (j.slot >= 0 && slots_[j.slot].active == &j) slots_[j.slot].active = nullptr;
                    it = jobs_.erase(it);
                } else {
                    ++it;
                }
            }
            // queued requests take free sequences in order, each the one sharing the longest
            // prefix with its prompt; Activation Decoding keeps one info layer's rows at a time
            while (!queue_.empty()) {
                job & j = *queue_.front();
                int32_t info = -1;
                for (const slot & sl : slots_) {
                    if (sl.active && sl.active->ctx_layer >= 0) info = sl.active->ctx_layer;
                }
                if (j.ctx_layer >= 0 && info >= 0 && info != j.ctx_layer) break;
                // the free sequence sharing the longest prefix (ties: the one idle longest)
                const size_t max_keep = j.req.prompt.size() - 1;
                int32_t best = -1;
                size_t best_common = 0;
                for (int32_t s = 0; s < n_seq_; ++s) {
                    if (slots_[s].active) continue;
                    const size_t c = common_prefix(slots_[s].tokens, j.req.prompt, max_keep);
                    if (best < 0 || c > best_common || (c == best_common && slots_[s].last_admit < slots_[best].last_admit)) {
                        best = s;
                        best_common = c;
                    }
                }
                // or a saved prompt sharing more (Activation Decoding rebuilds rows from its own
                // sequence's tokens: not from the cache)
                cache_entry entry = cache_.end();
                if (best >= 0 && j.ctx_layer < 0 && !cache_.empty()) {
                    size_t cached = 0;
                    entry = best_cached(j.req.prompt, max_keep, cached);
                    if (cached <= best_common) {
                        entry = cache_.end();
                    } else {  // into the free sequence idle longest: its cells are saved first
                        for (int32_t s = 0; s < n_seq_; ++s) {
                            if (!slots_[s].active && slots_[s].last_admit < slots_[best].last_admit) best = s;
                        }
                    }
                }
                if (best < 0) break;
                queue_.pop_front();
                admit(j, best, entry);
            }
            work.clear();
            for (slot & sl : slots_) {
                if (sl.active && !sl.active->finished && !sl.active->released) work.push_back(sl.active);
            }
            if (work.empty()) {
                if (stop_.load()) return;
                work_cv_.wait(lock);
                continue;
            }
        }
        if (stop_.load()) return;
        iterate(work);
    }
}

bool batch_engine::decode_call(const std::vector<call_token> & toks, int32_t row_begin, bool context, bool fuse) {
    const int32_t n = (int32_t) toks.size();
    owned_batch b(n);
    llama_batch & bt = b.get();
    for (int32_t i = 0; i < n; ++i) {
        bt.token[i] = toks[i].token;
        bt.pos[i] = toks[i].pos;
        bt.n_seq_id[i] = 1;
        bt.seq_id[i][0] = toks[i].seq;
        bt.logits[i] = i >= row_begin;
    }
    bt.n_tokens = n;
    capture_.set_final(fuse);
    capture_.expect(n, row_begin, n, context);
    const bool outputs_mode = capture_enabled_ && capture_.outputs_mode();
    if (outputs_mode && capture_.take_new_marks()) rebuild_graphs(ctx_.get());
    set_eval_callback(ctx_.get(), capture_enabled_ && capture_.needs_callback() ? &capture_ : nullptr);
    const auto t0 = clock_type::now();
    clear_last_error();
    int32_t rc;
    if (outputs_mode) {
        layer_capture::building marks(capture_);
        rc = llama_decode(ctx_.get(), bt);
        if (rc == 0) capture_.collect(ctx_->get_sched());
    } else {
        rc = llama_decode(ctx_.get(), bt);
    }
    decode_ms_ += ms_since(t0);
    n_decodes_ += 1;
    n_decoded_tokens_ += n;
    if (rc != 0) {
        last_error_ = rc == 2 ? "decoding was stopped" : with_detail("llama_decode failed with code " + std::to_string(rc));
        return false;
    }
    return true;
}

// Keeps output row k of the last call for j: its layers' captured rows and the final logits.
void batch_engine::take_output(job & j, int32_t k, int32_t batch_index) {
    const int32_t E = model_->n_embd();
    j.hidden.resize(j.layers.size() * (size_t) E);
    if (!j.layers.empty() && !capture_.complete()) {
        fail(j, capture_failure(capture_, model_->architecture()));
        return;
    }
    for (size_t l = 0; l < j.layers.size(); ++l) {
        const int32_t s = (int32_t) (std::find(capture_.layers().begin(), capture_.layers().end(), j.layers[l]) -
                                     capture_.layers().begin());
        std::memcpy(j.hidden.data() + l * E, capture_.rows(s) + (size_t) k * E, E * sizeof(float));
    }
    j.fused = capture_.final_seen();
    if (j.fused) {
        j.final_row.assign(capture_.final_row(k), capture_.final_row(k) + E);
    } else if (j.mature == model_->n_layer()) {
        const float * logits = llama_get_logits_ith(ctx_.get(), batch_index);
        if (!logits) {
            fail(j, "llama.cpp returned no logits");
            return;
        }
        j.logits.assign(logits, logits + model_->n_vocab());
    }
}

void batch_engine::iterate(std::vector<job *> & work) {
    update_threads();
    if (projector_ && projector_threads_ != threads_now_) {  // made by a submit, or the count changed
        projector_->set_n_threads(threads_now_);
        projector_threads_ = threads_now_;
    }
    // capture the union of the running sequences' layers (stable while they run: no new graphs)
    std::vector<int32_t> layers;
    int32_t ctx_layer = -1;
    for (job * j : work) {
        layers.insert(layers.end(), j->layers.begin(), j->layers.end());
        if (j->ctx_layer >= 0) ctx_layer = j->ctx_layer;
    }
    std::sort(layers.begin(), layers.end());
    layers.erase(std::unique(layers.begin(), layers.end()), layers.end());
    if (layers != capture_.layers()) capture_.set_layers(layers);
    capture_.set_context_layer(ctx_layer);
    llama_memory_t mem = llama_get_memory(ctx_.get());
    emitted_.clear();
    std::vector<job *> outputs;
    std::vector<call_token> toks;

    // Every answering sequence's last chosen token. A sequence's KV cache is a stream of its own,
    // so its positions keep their order whatever the others do (its results are those it gets
    // alone). llama.cpp takes the sequences of one call in consecutive ids: an idle sequence
    // between two answering ones gets a throwaway token (its cell is removed after the call), one
    // row of work instead of a second call; a prefilling one splits the call.
    // A sequence whose prompt lacks only its last token (the rest kept from its sequence or the
    // prompt cache) brings that token to the same call.
    std::vector<job *> by_slot(n_seq_, nullptr);
    auto next_token = [](const job * j) { return j->pending >= 0 ? j->pending : j->req.prompt.back(); };
    for (job * j : work) {
        const bool last_prompt_token = j->pending < 0 && !j->finished && j->n_chosen == 0 && j->ctx_layer < 0 &&
                                       j->n_prompt_done + 1 == j->req.prompt.size();
        if (j->pending >= 0 || last_prompt_token) by_slot[j->slot] = j;
    }
    auto fillable = [&](int32_t g) { return !slots_[g].active && slots_[g].tokens.size() < n_ctx_seq_; };
    std::vector<job *> run;
    std::vector<int32_t> fillers;
    for (int32_t s = 0; s < n_seq_;) {
        if (!by_slot[s]) {
            ++s;
            continue;
        }
        toks.clear();
        run.clear();
        fillers.clear();
        int32_t e = s;
        while (e < n_seq_) {
            if (by_slot[e]) {
                job * j = by_slot[e];
                toks.push_back({next_token(j), (llama_pos) slots_[e].tokens.size(), e});
                run.push_back(j);
                ++e;
                continue;
            }
            int32_t f = e;
            while (f < n_seq_ && !by_slot[f] && fillable(f)) ++f;
            if (f == n_seq_ || !by_slot[f]) break;
            for (int32_t g = e; g < f; ++g) {
                const auto & t = slots_[g].tokens;
                toks.push_back({t.empty() ? next_token(by_slot[f]) : t.back(), (llama_pos) t.size(), g});
                run.push_back(nullptr);
                fillers.push_back(g);
            }
            e = f;
        }
        // fused when every sequence in the call fuses (the fillers' rows are nobody's)
        const bool fuse = std::all_of(run.begin(), run.end(), [](const job * j) { return !j || j->fuses; });
        const bool ok = decode_call(toks, 0, false, fuse);
        for (int32_t g : fillers) llama_memory_seq_rm(mem, g, (llama_pos) slots_[g].tokens.size(), -1);
        for (size_t k = 0; k < run.size(); ++k) {
            job * j = run[k];
            if (!j) continue;
            if (!ok) {
                llama_memory_seq_rm(mem, j->slot, (llama_pos) slots_[j->slot].tokens.size(), -1);
                fail(*j, last_error_);
                continue;
            }
            slots_[j->slot].tokens.push_back(next_token(j));
            if (j->pending >= 0) {
                j->pending = -1;
            } else {
                j->n_prompt_done += 1;
            }
            take_output(*j, (int32_t) k, (int32_t) k);
            outputs.push_back(j);
        }
        s = e;
    }

    // then prompt chunks, one sequence per call, up to n_batch prompt tokens in all
    uint32_t budget = n_batch_;
    for (job * j : work) {
        const auto & prompt = j->req.prompt;
        if (j->finished || j->pending >= 0 || j->n_chosen > 0 || j->n_prompt_done >= prompt.size()) continue;
        if (budget == 0) break;
        slot & sl = slots_[j->slot];
        const int32_t take = (int32_t) std::min<size_t>(budget, prompt.size() - j->n_prompt_done);
        budget -= (uint32_t) take;
        const bool last = j->n_prompt_done + take == prompt.size();
        toks.clear();
        for (int32_t t = 0; t < take; ++t) {
            toks.push_back({prompt[j->n_prompt_done + t], (llama_pos) (sl.tokens.size() + t), j->slot});
        }
        const bool context = j->ctx_layer >= 0;
        if (!decode_call(toks, last ? take - 1 : take, context, last && j->fuses)) {
            llama_memory_seq_rm(mem, j->slot, (llama_pos) sl.tokens.size(), -1);
            fail(*j, last_error_);
            continue;
        }
        if (context && sl.context->n_rows() == sl.tokens.size()) {
            if (!capture_.context_seen()) {
                fail(*j, context_capture_failure(j->ctx_layer, model_->architecture()));
                continue;
            }
            sl.context->append_rows(capture_.context_rows(), take);
        }
        sl.tokens.insert(sl.tokens.end(), prompt.begin() + j->n_prompt_done, prompt.begin() + j->n_prompt_done + take);
        j->n_prompt_done += take;
        if (last) {
            take_output(*j, 0, take - 1);
            outputs.push_back(j);
        }
    }
    step_outputs(outputs);

    std::lock_guard<std::mutex> lock(mu_);
    stats_.n_decodes += n_decodes_;
    stats_.n_decoded_tokens += n_decoded_tokens_;
    stats_.decode_ms += decode_ms_;
    stats_.n_projections += n_projections_;
    stats_.n_fused += n_fused_;
    stats_.n_device_contrasts += n_device_contrasts_;
    stats_.step_ms += step_ms_;
    n_decodes_ = n_decoded_tokens_ = n_projections_ = n_fused_ = n_device_contrasts_ = 0;
    decode_ms_ = step_ms_ = 0.0;
    for (auto & [j, ev] : emitted_) {
        if (ev.kind == batch_event::step) stats_.n_steps += 1;
        j->events.push_back(std::move(ev));
    }
    emitted_.clear();
    for (job * j : work) {
        if (j->finished && slots_[j->slot].active == j) slots_[j->slot].active = nullptr;  // free for the next
    }
    event_cv_.notify_all();
}

void batch_engine::append_rows(const job & j) {
    const size_t at = hidden_.size();
    hidden_.insert(hidden_.end(), j.hidden.begin(), j.hidden.end());
    if (j.fused) {
        hidden_.resize(hidden_.size() + j.final_row.size());
        projector_->join_final(hidden_.data() + at, (int32_t) j.layers.size(), j.req.params.premature_norm,
                               j.final_row.data());
    }
}

void batch_engine::project_on_device(std::vector<job *> & outputs) {
    // DoLa jobs (two candidates or more, the final layer as mature, fused, raw premature rows)
    // whose contrast can run where the projection does: their rows go through one graph there,
    // and only their JSD, entropies and, per job, two rows come back (projector::project_dola)
    if (!projector_ || !projector_->device_contrast()) return;
    std::vector<job *> jobs;
    for (job * j : outputs) {
        if (!j->finished && contrast_on_device(*j->dec, j->fused, j->req.params.premature_norm, j->layers.size())) {
            jobs.push_back(j);
        }
    }
    if (jobs.empty()) return;
    hidden_.clear();
    std::vector<int32_t> group_rows;
    int32_t row = 0, n_jsd = 0;
    for (job * j : jobs) {
        append_rows(*j);
        j->dev_row = row;
        j->dev_jsd = n_jsd;
        j->dev_group = (int32_t) group_rows.size();
        group_rows.push_back((int32_t) j->layers.size() + 1);
        row += group_rows.back();
        n_jsd += (int32_t) j->layers.size();
    }
    dev_jsd_.resize(n_jsd);
    dev_entropy_.resize(jobs.size());
    if (!projector_->project_dola(hidden_.data(), group_rows, dev_jsd_.data(), dev_entropy_.data())) return;
    n_projections_ += 1;
    for (job * j : jobs) j->on_device = true;
}

void batch_engine::step_outputs(std::vector<job *> & outputs) {
    const auto t0 = clock_type::now();
    const int32_t N = model_->n_layer();
    const int64_t V = model_->n_vocab();
    for (job * j : outputs) j->on_device = false;
    project_on_device(outputs);
    // all rows of one norm through the output matrix together: the matrix streams once per norm
    // (a fused job's final row follows its layers' rows, which are normed on the host when asked)
    size_t total = 0;
    for (job * j : outputs) total += j->finished || j->on_device ? 0 : j->layers.size() + (j->fused ? 1 : 0);
    if (total > 0) {
        proj_.resize(total * V);
        size_t row = 0;
        for (bool norm : {false, true}) {
            hidden_.clear();
            const size_t first = row;
            for (job * j : outputs) {
                if (j->finished || j->on_device || (j->layers.empty() && !j->fused) ||
                    (j->req.params.premature_norm && !j->fused) != norm) {
                    continue;
                }
                j->proj_offset = row;
                append_rows(*j);
                row += j->layers.size() + (j->fused ? 1 : 0);
            }
            if (row > first) {
                projector_->project(hidden_.data(), (int32_t) (row - first), norm, proj_.data() + first * V);
                n_projections_ += 1;
            }
        }
    }
    lp_.resize(V);
    scores_.resize(V);
    for (job * j : outputs) {
        if (j->finished) continue;
        slot & sl = slots_[j->slot];
        try {
            decoder_rows rows;
            rows.n_vocab = V;
            rows.n_threads = threads_now_;
            n_fused_ += j->fused ? 1 : 0;
            std::optional<projected_rows> on_device;
            if (j->on_device) {  // its JSD and entropy came back; its rows stay there
                on_device.emplace(*projector_, j->dev_row);
                on_device->jsd = dev_jsd_.data() + j->dev_jsd;
                on_device->entropy = dev_entropy_[j->dev_group];
                rows.device = &*on_device;
                n_device_contrasts_ += 1;
            } else {
                rows.projected = j->layers.empty() && !j->fused ? nullptr : proj_.data() + j->proj_offset * V;
                if (j->fused) {
                    rows.mature = rows.projected + j->layers.size() * V;
                } else if (j->mature == N) {
                    rows.mature = j->logits.data();
                } else {  // early exit: the mature layer's row, copied (the decoder may overwrite rows)
                    const size_t k = std::find(j->layers.begin(), j->layers.end(), j->mature) - j->layers.begin();
                    mature_copy_.assign(rows.projected + k * V, rows.projected + (k + 1) * V);
                    rows.mature = mature_copy_.data();
                }
                check_finite(rows.mature, V);
            }
            context_entropy * context = nullptr;
            if (j->ctx_layer >= 0) {
                if (j->n_chosen == 0) sl.context->begin(j->req.prompt.size() - 1, j->req.prompt.size());
                context = sl.context->valid() ? sl.context.get() : nullptr;
                rows.context = context;
            }
            step_result res;
            j->dec->step(rows, lp_.data(), scores_.data(), res);
            if (j->on_device) check_finite(lp_.data(), V);
            const int32_t i = j->n_chosen++;
            const float bonus = i < (int32_t) j->req.eos_bonus.size() ? j->req.eos_bonus[i] : 0.0f;
            finish_step(*j->smp, scores_.data(), lp_.data(), V, sl.tokens, j->req.prompt.size(), bonus,
                        j->req.params.n_probs, context, chosen_lp_, res);
            const llama_token tok = res.token;
            j->answer->add(res);
            const bool end = j->answer->ended();
            if (!end) j->smp->accept(tok);  // the grammar's check first: a token it rejects is not decoded
            batch_event ev;
            ev.result = std::move(res);
            emit(*j, std::move(ev));
            if (end) {
                batch_event e;
                e.kind = batch_event::end;
                emit(*j, std::move(e));
                j->finished = true;
            } else {
                j->pending = tok;
            }
        } catch (const std::exception & e) {
            fail(*j, e.what());
        }
    }
    step_ms_ += ms_since(t0);
}

}  // namespace dola
