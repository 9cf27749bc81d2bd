// Early exit: project hidden states through the model's own output matrix, in one matmul on the
// backend that holds that matrix (no dequantized host copy of the LM head).
#pragma once

#include "dola-switches.h"

#include "ggml-cpp.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

struct llama_model;

namespace dola {

// The CPU backend's extra (repacked-layout) buffer types this build and CPU offer: AMX,
// CPU_REPACK, KleidiAI. llama.cpp may put the output matrix in one of them.
std::vector<ggml_backend_buffer_type_t> cpu_extra_buffer_types();
bool is_cpu_extra_buffer_type(ggml_backend_buffer_type_t buft);

class projector {
public:
    // env: its kernel and device_contrast settings (checked here: an unknown value throws)
    projector(const llama_model * model, const switches & env);
    projector(const projector &) = delete;
    projector & operator=(const projector &) = delete;

    void set_n_threads(int32_t n_threads);

    // Whether dola-cpp's own kernel would read this model's output matrix (plain host memory, not
    // a repacked CPU layout, a type it knows, DOLA_CPP_KERNEL not off): host_kernel() before
    // making a projector.
    static bool kernel_reads(const llama_model * model, const switches & env);

    // hidden: [n_rows][n_embd]; out: [n_rows][n_vocab]. norm applies the final norm first
    // (logit lens); check norm_supported() before asking for it.
    void project(const float * hidden, int32_t n_rows, bool norm, float * out);

    bool norm_supported() const { return norm_supported_; }

    // The output matrix's rows for these vocabulary ids as floats, [n][n_embd]. False when the
    // matrix is not in plain host memory (a GPU's, or a repacked CPU layout): use project().
    bool output_rows(const int32_t * ids, int32_t n, float * out) const;
    // Hidden rows through the final norm (RMSNorm times its weight), on the host, as project()
    // with norm=true computes them. [n_rows][n_embd]; out may be hidden (in place).
    void normalize(const float * hidden, int32_t n_rows, float * out);
    // The rows of a fused projection, in place: rows holds n_layers premature rows (normed here
    // when premature_norm) and room for one more, which takes final_row (normed already by the
    // graph). Then project() them raw.
    void join_final(float * rows, int32_t n_layers, bool premature_norm, const float * final_row);
    // The model's logits are exactly output @ result_norm (no bias, scale, soft-cap or LoRA), so
    // the engine may compute them itself together with the premature rows.
    bool can_fuse_final() const { return can_fuse_final_; }
    // Whether dola-cpp's own kernel reads the matrix (plain host memory, a type it knows): then it
    // computes a few rows' logits faster than llama.cpp's LM head in the graph (measured on an
    // AVX-512 CPU: plain decoding ~7% faster a token with the final row projected here).
    bool host_kernel() const { return use_rowmat_; }
    const std::string & backend_name() const { return backend_name_; }

    // DoLa's contrast where the logits are (switches::device_contrast: auto = on a GPU's own
    // buffers, on = on any backend, off): project hidden rows in groups, each [K candidates...,
    // mature] (raw: the fused final row is already normed; group_rows[g] = K_g + 1, K_g >= 2),
    // compute every row's log-softmax, each candidate's JSD against its group's mature row and each
    // mature entropy on the backend, in one graph, and bring back only jsd (K_0 values, then K_1,
    // ...) and entropy (one per group). False (nothing computed) where that is off or the backend
    // lacks an op: use project().
    bool project_dola(const float * hidden, const std::vector<int32_t> & group_rows, float * jsd, double * entropy);
    bool device_contrast() const { return device_contrast_; }
    // Rows rows[0..n) of the last project_dola()'s log-softmax (rows counted over all its groups:
    // a group's mature row is its last), [n_vocab] each, one wait for all.
    void fetch_log_softmax(int32_t n, const int32_t * rows, float * const * out);

private:
    void build(int32_t n_rows, bool norm);
    bool rowmat_faster(const float * hidden, int32_t n_rows, bool norm);
    void project_rowmat(const float * hidden, int32_t n_rows, bool norm, float * out);
    void project_ggml(const float * hidden, int32_t n_rows, bool norm, float * out);
    bool build_dola(int32_t n_rows, int32_t n_groups);

    ggml_tensor * output_ = nullptr;
    ggml_tensor * output_norm_ = nullptr;
    float norm_eps_ = 0.0f;
    bool norm_supported_ = false;
    int32_t n_embd_ = 0;
    int64_t n_vocab_ = 0;
    // declared before the allocators and graphs made on it, so that it is freed after them
    ggml_backend_ptr backend_;
    bool is_cpu_ = false;
    bool plain_host_ = false;  // ggml's plain layout in host memory: our kernels may read it
    bool use_rowmat_ = false;     // our kernels can read the matrix (dola-rowmat)
    bool rowmat_always_ = false;
    bool can_fuse_final_ = false;
    int32_t n_threads_ = 1;
    std::vector<float> normed_;
    std::vector<float> norm_weight_;  // the final norm's weight, copied to the host once
    std::string backend_name_;
    ggml_gallocr_ptr galloc_;
    ggml_context_ptr ctx_;
    ggml_cgraph * graph_ = nullptr;
    ggml_tensor * in_ = nullptr;
    ggml_tensor * out_ = nullptr;
    int32_t built_rows_ = -1;
    bool built_norm_ = false;
    std::vector<float> pad_;
    std::map<int32_t, bool> rowmat_faster_;  // (rows, norm) -> our kernel measured faster
    // the DoLa contrast graph (project_dola)
    bool device_contrast_ = false;
    ggml_gallocr_ptr galloc_d_;
    ggml_context_ptr ctx_d_;
    ggml_cgraph * graph_d_ = nullptr;
    ggml_tensor * in_d_ = nullptr;
    ggml_tensor * cand_d_ = nullptr;     // [sum K]: each candidate's row
    ggml_tensor * of_cand_d_ = nullptr;  // [sum K]: its group's mature row
    ggml_tensor * mature_d_ = nullptr;   // [n_groups]: each group's mature row
    ggml_tensor * lp_d_ = nullptr;   // [n_vocab, n_rows] log-softmax of every row
    // [1, sum K + n_groups]: per candidate the sum over the vocabulary of the JSD terms, then each
    // mature row's sum of p log p (one read for both)
    ggml_tensor * sums_d_ = nullptr;
    std::vector<float> sums_;
    std::vector<int32_t> index_;  // the three index inputs' values, one after the other
    int32_t built_d_rows_ = -1;
    int32_t built_d_groups_ = -1;
    bool d_supported_ = false;
};

}  // namespace dola
