// A loaded GGUF model: llama.cpp's weights, vocabulary and chat template. Knows no Python.
#pragma once

#include "llama-cpp.h"

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace dola {

struct model_params {
    int32_t n_gpu_layers = -1;  // -1 = all
    bool use_mmap = true;
    bool repack = true;  // let llama.cpp put weights in the CPU's extra buffer types (AMX, CPU_REPACK, ...)
    // a GPU build keeps the weights left on the CPU in the GPU's host buffer type (pinned memory)
    // ahead of the extra buffer types; true skips it (llama.cpp's --no-host)
    bool no_host = false;
    std::vector<std::string> rpc;  // RPC servers ("host:port") to offload layers to
    bool verbose = false;  // llama.cpp's log on stderr (switches::verbose; the first model decides)
};

class model {
public:
    model(const std::string & path, const model_params & params);
    ~model();
    // Some layers live on RPC servers: calls into the model go through rpc_call.
    bool uses_rpc() const { return uses_rpc_; }
    // Runs fn for this model: through rpc_call when it uses RPC, else directly.
    void call(const std::function<void()> & fn, const std::function<void()> & poll = {}) const;
    // An RPC server this model may use died: it must not be used or freed.
    bool rpc_lost() const;
    // Runs fn, which frees objects of this model's (a context, a projector, the weights): for an
    // RPC-backed model through call(), so that a server that died while idle is noticed as an
    // error there instead of parking the calling thread in ggml's abort. False when it was not
    // freed (a server is gone): the caller then leaves what is left unfreed.
    bool free_remote(const std::function<void()> & fn) const noexcept;

    llama_model * get() const { return model_.get(); }
    const llama_vocab * vocab() const { return vocab_; }

    int32_t n_layer() const { return n_layer_; }
    int32_t n_embd() const { return n_embd_; }
    int32_t n_vocab() const { return n_vocab_; }
    int32_t n_ctx_train() const;
    bool tied_embeddings() const { return tied_; }
    std::string architecture() const;
    std::string description() const;
    std::string meta(const std::string & key) const;  // "" when absent
    std::vector<std::pair<std::string, std::string>> metadata() const;
    std::string chat_template() const;
    bool is_eog(llama_token t) const;
    // Every end-of-generation token of the vocabulary (EOS, EOT, EOM, ...: llama_vocab_is_eog).
    const std::vector<llama_token> & eog_tokens() const { return eog_; }

    // Throws dola::error when t is not a token id of this vocabulary: the one check of token ids,
    // with the message users see. 64-bit so that callers can check ids before narrowing them.
    void check_token(int64_t t) const;
    // That error's message for an id given as text (one too large even for 64 bits).
    std::string outside_vocabulary(const std::string & id) const;

    // llama.cpp's exceptions (e.g. a vocabulary without byte tokens) become dola::error
    std::vector<llama_token> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    // Both check the ids (check_token).
    std::string token_to_piece(llama_token t, bool special) const;
    std::string detokenize(const std::vector<llama_token> & tokens, bool special) const;
    // Renders chat messages with the GGUF's template through llama.cpp's built-in template
    // matcher (which never executes the template text).
    std::string apply_chat_template(const std::vector<std::pair<std::string, std::string>> & messages,
                                    bool add_assistant, const std::string & tmpl_override) const;

private:
    std::vector<llama_token> tokenize_impl(const std::string & text, bool add_special, bool parse_special) const;
    std::string piece(llama_token t, bool special) const;  // t already checked

    llama_model_ptr model_;
    const llama_vocab * vocab_ = nullptr;
    int32_t n_layer_ = 0, n_embd_ = 0, n_vocab_ = 0;
    bool tied_ = false;
    std::vector<llama_token> eog_;
    bool uses_rpc_ = false;
    uint64_t rpc_epoch_ = 0;
};

}  // namespace dola
