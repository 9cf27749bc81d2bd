#include "dola-model.h"

#include "dola-error.h"
#include "dola-gguf.h"
#include "dola-log.h"
#include "dola-rpc.h"

#include "llama-model.h"  // internal: tied-embedding detection

#include <algorithm>
#include <cstring>
#include <limits>

namespace dola {

model::model(const std::string & path, const model_params & params) {
    backend_init_once(params.verbose);
    check_gguf_file(path);
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = params.n_gpu_layers < 0 ? -1 : params.n_gpu_layers;
    if (!params.use_mmap) mp.load_mode = LLAMA_LOAD_MODE_NONE;
    mp.use_extra_bufts = params.repack;
    mp.no_host = params.no_host;
    std::vector<ggml_backend_dev_t> devices;
    if (!params.rpc.empty()) {
        // this machine's GPUs, then the RPC servers' devices; the CPU keeps what is not offloaded
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t d = ggml_backend_dev_get(i);
            const auto t = ggml_backend_dev_type(d);
            if (t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU) devices.push_back(d);
        }
        for (ggml_backend_dev_t d : rpc_devices(params.rpc)) devices.push_back(d);
        devices.push_back(nullptr);
        mp.devices = devices.data();
        uses_rpc_ = true;
        rpc_epoch_ = rpc_failures();
    }
    clear_last_error();
    call([&] { model_.reset(llama_model_load_from_file(path.c_str(), mp)); });
    if (!model_) throw error(with_detail("llama.cpp could not load '" + path + "'"));
    if (llama_model_has_encoder(get()) || !llama_model_has_decoder(get())) {
        throw error("'" + path + "' is an encoder or encoder-decoder model; dola-cpp needs a decoder-only model");
    }
    vocab_ = llama_model_get_vocab(get());
    n_layer_ = llama_model_n_layer(get());
    n_embd_ = llama_model_n_embd(get());
    n_vocab_ = llama_vocab_n_tokens(vocab_);
    for (llama_token t = 0; t < n_vocab_; ++t) {
        if (llama_vocab_is_eog(vocab_, t)) eog_.push_back(t);
    }
    const ggml_tensor * out = get()->output;
    tied_ = out == nullptr || (get()->tok_embd && std::strcmp(out->name, get()->tok_embd->name) == 0);
}

model::~model() {
    if (!free_remote([this] { model_.reset(); })) (void) model_.release();  // a dead server: left
}

bool model::free_remote(const std::function<void()> & fn) const noexcept {
    if (rpc_lost()) return false;  // freeing would talk to a dead server
    try {
        call(fn);
        return true;
    } catch (...) {
        return false;
    }
}

void model::call(const std::function<void()> & fn, const std::function<void()> & poll) const {
    if (uses_rpc_) rpc_call(rpc_epoch_, fn, poll);
    else fn();
}

bool model::rpc_lost() const { return uses_rpc_ && rpc_failures() != rpc_epoch_; }

int32_t model::n_ctx_train() const { return llama_model_n_ctx_train(get()); }

std::string model::meta(const std::string & key) const {
    std::vector<char> buf(256);
    int32_t n = llama_model_meta_val_str(get(), key.c_str(), buf.data(), buf.size());
    if (n < 0) return "";
    if ((size_t) n >= buf.size()) {
        buf.resize(n + 1);
        llama_model_meta_val_str(get(), key.c_str(), buf.data(), buf.size());
    }
    return std::string(buf.data(), n);
}

std::vector<std::pair<std::string, std::string>> model::metadata() const {
    std::vector<std::pair<std::string, std::string>> out;
    const int32_t n = llama_model_meta_count(get());
    std::vector<char> key(512), val(4096);
    for (int32_t i = 0; i < n; ++i) {
        if (llama_model_meta_key_by_index(get(), i, key.data(), key.size()) < 0) continue;
        int32_t m = llama_model_meta_val_str_by_index(get(), i, val.data(), val.size());
        if (m < 0) continue;
        if ((size_t) m >= val.size()) {
            val.resize(m + 1);
            llama_model_meta_val_str_by_index(get(), i, val.data(), val.size());
        }
        out.emplace_back(key.data(), std::string(val.data(), std::min<size_t>(m, val.size() - 1)));
    }
    return out;
}

std::string model::architecture() const { return meta("general.architecture"); }

std::string model::description() const {
    char buf[256];
    llama_model_desc(get(), buf, sizeof buf);
    return buf;
}

std::string model::chat_template() const {
    const char * t = llama_model_chat_template(get(), nullptr);
    return t ? t : "";
}

bool model::is_eog(llama_token t) const { return llama_vocab_is_eog(vocab_, t); }

void model::check_token(int64_t t) const {
    if (t < 0 || t >= n_vocab_) throw error(outside_vocabulary(std::to_string(t)));
}

std::string model::outside_vocabulary(const std::string & id) const {
    return "token id " + id + " is outside the vocabulary (0.." + std::to_string(n_vocab_ - 1) + ")";
}

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
    check_token(t);
    return piece(t, special);
}

std::string model::piece(llama_token t, bool special) const {
    char buf[256];
    int32_t n = llama_token_to_piece(vocab_, t, buf, sizeof buf, 0, special);
    if (n >= 0) return std::string(buf, n);
    std::string big(-n, '\0');
    n = llama_token_to_piece(vocab_, t, big.data(), (int32_t) big.size(), 0, special);
    return n < 0 ? std::string() : big.substr(0, n);
}

std::string model::detokenize(const std::vector<llama_token> & tokens, bool special) const {
    for (llama_token t : tokens) check_token(t);  // all of them before any text
    std::string out;
    for (llama_token t : tokens) out += piece(t, special);
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

}  // namespace dola
