#include "dola-engine.h"

#include "gguf.h"
#include "llama-model.h"  // internal: tied-embedding detection

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <mutex>
#include <set>
#include <string_view>
#include <thread>
#include <unordered_set>

namespace dola {

namespace {

std::mutex g_log_mutex;
std::string g_last_error;
bool g_verbose = false;

void log_cb(ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR) {
        // keep the first error since the last clear: later ones are usually "failed to load model"
        std::lock_guard<std::mutex> lock(g_log_mutex);
        if (g_last_error.empty()) g_last_error = text;
    }
    if (g_verbose) std::fputs(text, stderr);
}

std::string last_error() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    std::string s = g_last_error;
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
    // "llama_model_load: error loading model: X" -> "X"
    for (const char * prefix : {"error loading model: ", "error loading model hyperparameters: ",
                                "error loading model vocabulary: "}) {
        const size_t at = s.find(prefix);
        if (at != std::string::npos) s = s.substr(at + std::strlen(prefix));
    }
    return s;
}

void clear_last_error() {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    g_last_error.clear();
}

std::string with_detail(std::string msg) {
    const std::string detail = last_error();
    if (!detail.empty()) msg += " (llama.cpp: " + detail + ")";
    return msg;
}

}  // namespace

void backend_init_once() {
    static std::once_flag once;
    std::call_once(once, [] {
        const char * v = std::getenv("DOLA_CPP_VERBOSE");
        g_verbose = v && *v && std::strcmp(v, "0") != 0;
        llama_log_set(log_cb, nullptr);
        llama_backend_init();
    });
}

namespace {

bool gguf_get_int(const gguf_context * g, const std::string & key, int64_t & out) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) return false;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT8: out = gguf_get_val_u8(g, id); return true;
        case GGUF_TYPE_INT8: out = gguf_get_val_i8(g, id); return true;
        case GGUF_TYPE_UINT16: out = gguf_get_val_u16(g, id); return true;
        case GGUF_TYPE_INT16: out = gguf_get_val_i16(g, id); return true;
        case GGUF_TYPE_UINT32: out = gguf_get_val_u32(g, id); return true;
        case GGUF_TYPE_INT32: out = gguf_get_val_i32(g, id); return true;
        case GGUF_TYPE_UINT64: out = (int64_t) std::min<uint64_t>(gguf_get_val_u64(g, id), INT64_MAX); return true;
        case GGUF_TYPE_INT64: out = gguf_get_val_i64(g, id); return true;
        default: return false;
    }
}

// Metadata that llama.cpp checks with GGML_ASSERT (an abort, not an error) while loading or
// evaluating; found by fuzzing (tests/test_fuzz.py). Returns a description of the first problem.
std::string check_gguf_metadata(const gguf_context * g) {
    const int64_t arch_id = gguf_find_key(g, "general.architecture");
    if (arch_id < 0 || gguf_get_kv_type(g, arch_id) != GGUF_TYPE_STRING) return "";  // llama.cpp says so itself
    const std::string arch = gguf_get_val_str(g, arch_id);
    int64_t n_layer = 0;
    if (gguf_get_int(g, arch + ".block_count", n_layer) && (n_layer < 1 || n_layer > 512)) {
        return arch + ".block_count is " + std::to_string(n_layer) + " (llama.cpp supports 1..512 layers)";
    }
    for (const char * k : {".attention.layer_norm_rms_epsilon", ".attention.layer_norm_epsilon"}) {
        const int64_t id = gguf_find_key(g, (arch + k).c_str());
        if (id >= 0 && gguf_get_kv_type(g, id) == GGUF_TYPE_FLOAT32) {
            const float eps = gguf_get_val_f32(g, id);
            if (!(eps >= 0.0f) || !std::isfinite(eps)) return arch + k + " is " + std::to_string(eps) + " (must be >= 0)";
        }
    }
    const int64_t tok_id = gguf_find_key(g, "tokenizer.ggml.tokens");
    if (tok_id >= 0 && gguf_get_kv_type(g, tok_id) == GGUF_TYPE_ARRAY && gguf_get_arr_type(g, tok_id) == GGUF_TYPE_STRING) {
        const size_t n = gguf_get_arr_n(g, tok_id);
        std::unordered_set<std::string_view> seen;
        seen.reserve(n);
        for (size_t i = 0; i < n; ++i) {
            const char * t = gguf_get_arr_str(g, tok_id, i);
            if (!seen.insert(std::string_view(t)).second) {
                return "the vocabulary lists the token '" + std::string(t).substr(0, 40) + "' twice (id " + std::to_string(i) + ")";
            }
        }
    }
    return "";
}

void check_finite(const float * logits, int64_t n) {
    if (!all_finite(logits, n)) {
        throw error("the model produced non-finite logits (NaN or inf): its weights are corrupt or its activations overflow");
    }
}

}  // namespace

void check_gguf_file(const std::string & path) {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f) throw error("cannot open model file '" + path + "': no such file or not readable");
    const uint64_t file_size = (uint64_t) f.tellg();
    f.seekg(0);
    char magic[4] = {0, 0, 0, 0};
    f.read(magic, 4);
    if (!f || std::memcmp(magic, "GGUF", 4) != 0) {
        throw error("'" + path + "' is not a GGUF model file (expected the magic bytes 'GGUF')");
    }
    clear_last_error();
    gguf_init_params params = {/*.no_alloc =*/ true, /*.ctx =*/ nullptr};
    gguf_context * g = gguf_init_from_file(path.c_str(), params);
    if (!g) throw error(with_detail("'" + path + "' has a malformed or truncated GGUF header"));
    const uint64_t data_offset = gguf_get_data_offset(g);
    const int64_t n = gguf_get_n_tensors(g);
    std::string bad;
    for (int64_t i = 0; i < n && bad.empty(); ++i) {
        const uint64_t end = data_offset + gguf_get_tensor_offset(g, i) + gguf_get_tensor_size(g, i);
        if (end > file_size) bad = gguf_get_tensor_name(g, i);
    }
    std::string problem;
    try {
        problem = check_gguf_metadata(g);
    } catch (...) {
        gguf_free(g);
        throw;
    }
    gguf_free(g);
    if (!problem.empty()) throw error("'" + path + "' has invalid metadata: " + problem);
    if (!bad.empty()) {
        throw error("'" + path + "' is truncated: tensor '" + bad + "' extends past the end of the file (" +
                    std::to_string(file_size) + " bytes); download it again");
    }
}

void convert_model(const std::string & src, const std::string & dst, const std::string & type, int32_t n_threads) {
    backend_init_once();
    check_gguf_file(src);
    llama_model_quantize_params qp = llama_model_quantize_default_params();
    if (type == "F32") {
        qp.ftype = LLAMA_FTYPE_ALL_F32;
    } else if (type == "F16") {
        qp.ftype = LLAMA_FTYPE_MOSTLY_F16;
    } else if (type == "Q8_0") {
        qp.ftype = LLAMA_FTYPE_MOSTLY_Q8_0;
    } else {
        throw error("unsupported conversion type '" + type + "' (use F32, F16 or Q8_0)");
    }
    qp.allow_requantize = true;
    qp.nthread = n_threads;
    clear_last_error();
    if (llama_model_quantize(src.c_str(), dst.c_str(), &qp) != 0) {
        throw error(with_detail("could not convert '" + src + "' to " + type));
    }
}

// ---------------------------------------------------------------------------------------------
// model

model::model(const std::string & path, const model_params & params) {
    backend_init_once();
    check_gguf_file(path);
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = params.n_gpu_layers < 0 ? -1 : params.n_gpu_layers;
    if (!params.use_mmap) mp.load_mode = LLAMA_LOAD_MODE_NONE;
    mp.use_extra_bufts = params.repack;
    clear_last_error();
    model_ = llama_model_load_from_file(path.c_str(), mp);
    if (!model_) throw error(with_detail("llama.cpp could not load '" + path + "'"));
    if (llama_model_has_encoder(model_) || !llama_model_has_decoder(model_)) {
        llama_model_free(model_);
        throw error("'" + path + "' is an encoder or encoder-decoder model; dola-cpp needs a decoder-only model");
    }
    vocab_ = llama_model_get_vocab(model_);
    n_layer_ = llama_model_n_layer(model_);
    n_embd_ = llama_model_n_embd(model_);
    n_vocab_ = llama_vocab_n_tokens(vocab_);
    const ggml_tensor * out = model_->output;
    tied_ = out == nullptr || (model_->tok_embd && std::strcmp(out->name, model_->tok_embd->name) == 0);
}

model::~model() {
    if (model_) llama_model_free(model_);
}

int32_t model::n_ctx_train() const { return llama_model_n_ctx_train(model_); }

std::string model::meta(const std::string & key) const {
    std::vector<char> buf(256);
    int32_t n = llama_model_meta_val_str(model_, key.c_str(), buf.data(), buf.size());
    if (n < 0) return "";
    if ((size_t) n >= buf.size()) {
        buf.resize(n + 1);
        llama_model_meta_val_str(model_, key.c_str(), buf.data(), buf.size());
    }
    return std::string(buf.data(), n);
}

std::vector<std::pair<std::string, std::string>> model::metadata() const {
    std::vector<std::pair<std::string, std::string>> out;
    const int32_t n = llama_model_meta_count(model_);
    std::vector<char> key(512), val(4096);
    for (int32_t i = 0; i < n; ++i) {
        if (llama_model_meta_key_by_index(model_, i, key.data(), key.size()) < 0) continue;
        int32_t m = llama_model_meta_val_str_by_index(model_, i, val.data(), val.size());
        if (m < 0) continue;
        if ((size_t) m >= val.size()) {
            val.resize(m + 1);
            llama_model_meta_val_str_by_index(model_, i, val.data(), val.size());
        }
        out.emplace_back(key.data(), std::string(val.data(), std::min<size_t>(m, val.size() - 1)));
    }
    return out;
}

std::string model::architecture() const { return meta("general.architecture"); }

std::string model::description() const {
    char buf[256];
    llama_model_desc(model_, buf, sizeof buf);
    return buf;
}

std::string model::chat_template() const {
    const char * t = llama_model_chat_template(model_, nullptr);
    return t ? t : "";
}

bool model::add_bos() const { return llama_vocab_get_add_bos(vocab_); }
llama_token model::eos() const { return llama_vocab_eos(vocab_); }
bool model::is_eog(llama_token t) const { return llama_vocab_is_eog(vocab_, t); }
uint64_t model::n_params() const { return llama_model_n_params(model_); }
uint64_t model::size_bytes() const { return llama_model_size(model_); }

std::vector<llama_token> model::tokenize_impl(const std::string & text, bool add_special, bool parse_special) const {
    const int32_t cap = (int32_t) std::min<size_t>(text.size() + 8, (size_t) INT32_MAX);
    std::vector<llama_token> out(cap);
    int32_t n = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), out.data(), cap, add_special, parse_special);
    if (n < 0) {
        out.resize(-n);
        n = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), out.data(), -n, add_special, parse_special);
    }
    if (n < 0) throw error("tokenization failed");
    out.resize(n);
    return out;
}

std::vector<llama_token> model::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    try {
        return tokenize_impl(text, add_special, parse_special);
    } catch (const error &) {
        throw;
    } catch (const std::exception & e) {
        // e.g. a SentencePiece vocabulary without the <0xXX> byte tokens it falls back to
        throw error(std::string("could not tokenize the text: the model's vocabulary is malformed (") + e.what() + ")");
    }
}

std::string model::token_to_piece(llama_token t, bool special) const {
    char buf[256];
    int32_t n = llama_token_to_piece(vocab_, t, buf, sizeof buf, 0, special);
    if (n >= 0) return std::string(buf, n);
    std::string big(-n, '\0');
    n = llama_token_to_piece(vocab_, t, big.data(), (int32_t) big.size(), 0, special);
    return n < 0 ? std::string() : big.substr(0, n);
}

std::string model::detokenize(const std::vector<llama_token> & tokens, bool special) const {
    std::string out;
    for (llama_token t : tokens) out += token_to_piece(t, special);
    return out;
}

std::string model::apply_chat_template(const std::vector<std::pair<std::string, std::string>> & messages,
                                       bool add_assistant, const std::string & tmpl_override) const {
    const std::string tmpl = tmpl_override.empty() ? chat_template() : tmpl_override;
    if (tmpl.empty()) throw error("this model has no chat template in its GGUF metadata");
    std::vector<llama_chat_message> msgs;
    msgs.reserve(messages.size());
    for (const auto & m : messages) msgs.push_back({m.first.c_str(), m.second.c_str()});
    size_t total = 256;
    for (const auto & m : messages) total += m.second.size() * 2 + 64;
    std::vector<char> buf(total);
    int32_t n = llama_chat_apply_template(tmpl.c_str(), msgs.data(), msgs.size(), add_assistant, buf.data(), (int32_t) buf.size());
    if (n < 0) throw error("the model's chat template is not one llama.cpp recognises; use a raw prompt instead");
    if ((size_t) n > buf.size()) {
        buf.resize(n);
        n = llama_chat_apply_template(tmpl.c_str(), msgs.data(), msgs.size(), add_assistant, buf.data(), (int32_t) buf.size());
    }
    return std::string(buf.data(), n);
}

// ---------------------------------------------------------------------------------------------
// session

namespace {

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
    capture_enabled_ = params.capture;
    if (capture_enabled_) {
        cp.cb_eval = layer_capture::callback;
        cp.cb_eval_user_data = &capture_;
    }
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
    ctx_ = llama_init_from_model(model_->get(), cp);
    if (!ctx_) throw error(with_detail("could not create a context of " + std::to_string(n_ctx_) + " tokens"));
    n_ctx_ = llama_n_ctx(ctx_);
    last_check_ = std::chrono::steady_clock::now();
}

session::~session() {
    if (chain_) llama_sampler_free(chain_);
    if (ctx_) llama_free(ctx_);
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

    std::vector<int32_t> layers;
    for (int32_t l : p.candidates) {
        if (std::find(layers.begin(), layers.end(), l) == layers.end()) layers.push_back(l);
    }
    if (!p.candidates.empty() && mature != N && std::find(layers.begin(), layers.end(), mature) == layers.end()) {
        layers.push_back(mature);
    }
    if ((!layers.empty() || mature != N) && !capture_enabled_) {
        throw error("this context was created without layer capture; DoLa needs it");
    }
    if (!layers.empty() || mature != N) {
        if (!projector_) projector_ = std::make_unique<projector>(model_->get());
        projector_->set_n_threads(threads_now_);
        if (p.premature_norm && !projector_->norm_supported()) {
            throw error("premature_norm is not supported for architecture '" + model_->architecture() + "'");
        }
    }
    // With DoLa against the final layer, the logits come from the same projection as the
    // premature rows: one pass over the output matrix instead of two (SPEC §7).
    const bool fuse = !p.candidates.empty() && mature == N && !p.premature_norm && std::getenv("DOLA_CPP_NO_FUSE") == nullptr &&
                      projector_ && projector_->can_fuse_final();
    if (layers != capture_layers_ || fuse != fuse_final_) have_outputs_ = false;
    capture_layers_ = layers;
    fuse_final_ = fuse;
    capture_.set_layers(layers);
    capture_.set_final(fuse);

    params_ = p;
    params_.mature = mature;
    if (chain_) {
        llama_sampler_free(chain_);
        chain_ = nullptr;
    }
    if (p.temperature > 0.0f) {
        // transformers' order: temperature, then top-k, top-p, min-p on the tempered scores.
        chain_ = llama_sampler_chain_init(llama_sampler_chain_default_params());
        llama_sampler_chain_add(chain_, llama_sampler_init_temp(p.temperature));
        if (p.top_k > 0) llama_sampler_chain_add(chain_, llama_sampler_init_top_k(p.top_k));
        if (p.top_p < 1.0f) llama_sampler_chain_add(chain_, llama_sampler_init_top_p(p.top_p, 1));
        if (p.min_p > 0.0f) llama_sampler_chain_add(chain_, llama_sampler_init_min_p(p.min_p, 1));
        llama_sampler_chain_add(chain_, llama_sampler_init_dist(p.seed));
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
    llama_memory_t mem = llama_get_memory(ctx_);
    const llama_pos pos_max = llama_memory_seq_pos_max(mem, 0);
    const size_t kept = pos_max < 0 ? 0 : std::min(tokens_.size(), (size_t) pos_max + 1);
    tokens_.resize(kept);
    have_outputs_ = false;
}

void session::update_threads() {
    const int32_t n = governor_.threads();
    if (n == threads_now_) return;
    threads_now_ = n;
    llama_set_n_threads(ctx_, n, n);
    if (projector_) projector_->set_n_threads(n);
}

void session::decode_chunk(const llama_token * toks, int32_t n, int32_t row_begin, int32_t row_end) {
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
    capture_.expect(n, row_begin, row_end);
    clear_last_error();
    const int32_t rc = llama_decode(ctx_, batch);
    llama_batch_free(batch);
    if (rc == 2) {
        sync_cache_after_failure();
        throw aborted();
    }
    if (rc != 0) {
        sync_cache_after_failure();
        if (rc == 1) throw error("the context is full (" + std::to_string(n_ctx_) + " tokens); use a larger n_ctx");
        throw error(with_detail("llama_decode failed with code " + std::to_string(rc)));
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
    llama_memory_clear(llama_get_memory(ctx_), true);
    tokens_.clear();
    have_outputs_ = false;
}

size_t session::keep_cached_prefix(const std::vector<llama_token> & toks, size_t max_keep) {
    size_t common = 0;
    const size_t limit = std::min({tokens_.size(), toks.size(), max_keep});
    while (common < limit && tokens_[common] == toks[common]) ++common;
    if (common < tokens_.size()) {
        if (!llama_memory_seq_rm(llama_get_memory(ctx_), 0, (llama_pos) common, -1)) {
            clear();  // memories that cannot drop a suffix (recurrent) start over
            common = 0;
        }
        tokens_.resize(common);
    }
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
        decode_chunk(prompt.data() + i, n, last ? n - 1 : 0, last ? n : 0);
    }
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

step_result session::sample() {
    if (!have_outputs_) throw error("no outputs to sample from: prefill a prompt first");
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t V = model_->n_vocab();
    const int32_t N = model_->n_layer();
    const int32_t K = (int32_t) params_.candidates.size();
    scores_.resize(V);
    lp_.resize(V);
    step_result res;

    const float * mature = nullptr;
    const bool fused = fuse_final_ && capture_.final_seen();
    if (params_.mature == N && !fused) {
        mature = llama_get_logits_ith(ctx_, -1);
        if (!mature) throw error("llama.cpp returned no logits");
    }
    if (K > 0 || params_.mature != N) {
        // Gather the captured last rows of all needed layers (and the final normed state when
        // fused) and project them in one matmul.
        const int32_t E = model_->n_embd();
        const int32_t n_proj = (int32_t) capture_layers_.size() + (fused ? 1 : 0);
        hidden_.resize((size_t) n_proj * E);
        for (int32_t s = 0; s < (int32_t) capture_layers_.size(); ++s) {
            std::memcpy(hidden_.data() + (size_t) s * E, capture_.rows(s), E * sizeof(float));
        }
        if (fused) std::memcpy(hidden_.data() + (size_t) (n_proj - 1) * E, capture_.final_row(), E * sizeof(float));
        cand_logits_.resize((size_t) n_proj * V);
        projector_->project(hidden_.data(), n_proj, params_.premature_norm, cand_logits_.data());
        if (fused) mature = cand_logits_.data() + (size_t) (n_proj - 1) * V;
        if (params_.mature != N) {
            const size_t slot = std::find(capture_layers_.begin(), capture_layers_.end(), params_.mature) - capture_layers_.begin();
            mature_hidden_logits_.assign(cand_logits_.begin() + slot * V, cand_logits_.begin() + (slot + 1) * V);
            mature = mature_hidden_logits_.data();
        }
    }
    check_finite(mature, V);
    if (K > 0) {
        // candidates occupy the first K slots, in order
        contrast_result c = dola_step(mature, cand_logits_.data(), K, V, params_.relative_top, lp_.data(), scores_.data(),
                                      threads_now_);
        res.premature_layer = params_.candidates[c.premature_index];
        res.jsd = std::move(c.jsd);
        res.entropy = (float) c.entropy;
    } else {
        log_softmax(mature, lp_.data(), V);
        res.entropy = (float) entropy(lp_.data(), V);
        std::memcpy(scores_.data(), mature, V * sizeof(float));
    }
    repetition_penalty(scores_.data(), V, tokens_.data(), (int64_t) tokens_.size(), params_.repetition_penalty);

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
        llama_sampler_apply(chain_, &arr);
        if (arr.selected < 0 || arr.selected >= (int64_t) arr.size) throw error("the sampler selected no token");
        tok = arr.data[arr.selected].id;
    }
    res.token = tok;
    res.mature_logprob = lp_[tok];
    res.score = scores_[tok];
    timings_.contrast_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    return res;
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
    tokens_.clear();  // force a full decode so every row is captured from this prompt
    llama_memory_clear(llama_get_memory(ctx_), true);
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
            src = llama_get_logits_ith(ctx_, -1);
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
    const int32_t K = (int32_t) params_.candidates.size();
    const int32_t n_proj = (int32_t) capture_layers_.size();
    const size_t first_row = n_prefix - 1;   // position whose output predicts toks[n_prefix]
    const size_t n_in = toks.size() - 1;     // the last token is only predicted
    score_result res;

    // Reuse the cached prefix, but never past first_row (its row must be recomputed).
    const size_t common = keep_cached_prefix(toks, first_row);
    capture_.set_final(false);  // several rows: the mature logits come from llama.cpp
    capture_override restore{*this};

    // Rows with outputs are projected K at a time per row; bound the scratch to ~128 MB.
    const size_t rows_per_chunk = std::max<size_t>(1, std::min<size_t>(n_batch_, (size_t) (32u << 20) / ((size_t) std::max(n_proj, 1) * V)));
    std::vector<float> proj, lp(V), diff(V), mature_buf;
    for (size_t i = common; i < n_in;) {
        // prefix chunks carry no outputs; answer chunks output every row
        const size_t n = i < first_row ? std::min<size_t>(n_batch_, first_row - i)
                                       : std::min<size_t>(std::min<size_t>(n_batch_, rows_per_chunk), n_in - i);
        const int32_t n_rows = i < first_row ? 0 : (int32_t) n;
        decode_chunk(toks.data() + i, (int32_t) n, 0, n_rows);
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
                const size_t pos = i + r;
                const llama_token y = toks[pos + 1];
                float * row_proj = proj.data() + (size_t) r * n_proj * V;
                const float * mature;
                if (params_.mature == N) {
                    mature = llama_get_logits_ith(ctx_, r);
                } else {
                    const size_t slot = std::find(capture_layers_.begin(), capture_layers_.end(), params_.mature) - capture_layers_.begin();
                    mature_buf.assign(row_proj + slot * V, row_proj + (slot + 1) * V);
                    mature = mature_buf.data();
                }
                check_finite(mature, V);
                float s;
                int32_t layer = -1;
                if (K == 0) {
                    log_softmax(mature, lp.data(), V);
                    s = lp[y];
                } else {
                    contrast_result c = dola_step(mature, row_proj, K, V, 0.0, lp.data(), nullptr, threads_now_);
                    layer = params_.candidates[c.premature_index];
                    lm_score_diff(lp.data(), row_proj + (size_t) c.premature_index * V, V, post_softmax, relative_top, mask_value, diff.data());
                    s = diff[y];
                }
                res.token_scores.push_back(s);
                res.premature_layers.push_back(layer);
                res.total += s;
            }
        }
        i += n;
    }
    return res;
}

}  // namespace dola
