#include "dola-gguf.h"

#include "dola-error.h"
#include "dola-log.h"

#include "ggml-cpp.h"  // gguf_context_ptr
#include "gguf.h"
#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <string_view>
#include <unordered_set>

namespace dola {

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
    gguf_context_ptr owned(gguf_init_from_file(path.c_str(), params));
    const gguf_context * g = owned.get();
    if (!g) throw error(with_detail("'" + path + "' has a malformed or truncated GGUF header"));
    const uint64_t data_offset = gguf_get_data_offset(g);
    const int64_t n = gguf_get_n_tensors(g);
    std::string bad;
    for (int64_t i = 0; i < n && bad.empty(); ++i) {
        const uint64_t end = data_offset + gguf_get_tensor_offset(g, i) + gguf_get_tensor_size(g, i);
        if (end > file_size) bad = gguf_get_tensor_name(g, i);
    }
    const std::string problem = check_gguf_metadata(g);
    if (!problem.empty()) throw error("'" + path + "' has invalid metadata: " + problem);
    if (!bad.empty()) {
        throw error("'" + path + "' is truncated: tensor '" + bad + "' extends past the end of the file (" +
                    std::to_string(file_size) + " bytes); download it again");
    }
}

void convert_model(const std::string & src, const std::string & dst, const std::string & type, int32_t n_threads,
                   bool verbose) {
    backend_init_once(verbose);
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

}  // namespace dola
