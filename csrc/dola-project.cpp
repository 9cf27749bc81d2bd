#include "dola-project.h"

#include "dola-error.h"
#include "dola-rowmat.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "llama-model.h"  // internal: the output matrix and final norm of the loaded model

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>

namespace dola {

namespace {

// Architectures whose final norm is a plain RMSNorm times a weight (no bias, no extra scale).
bool final_norm_is_rms(llm_arch arch) {
    switch (arch) {
        case LLM_ARCH_LLAMA:
        case LLM_ARCH_MISTRAL3:
        case LLM_ARCH_QWEN2:
        case LLM_ARCH_QWEN3:
        case LLM_ARCH_GEMMA:
        case LLM_ARCH_GEMMA2:
        case LLM_ARCH_GEMMA3:
        case LLM_ARCH_PHI3:
        case LLM_ARCH_OLMO2:
            return true;
        default:
            return false;
    }
}

// The first node of the graph the backend cannot compute, or null. Whatever buffer llama.cpp
// chose for the weights, only run what the backend says it can.
const ggml_tensor * first_unsupported(ggml_backend_t backend, ggml_cgraph * graph) {
    for (int i = 0; i < ggml_graph_n_nodes(graph); ++i) {
        if (!ggml_backend_supports_op(backend, ggml_graph_node(graph, i))) return ggml_graph_node(graph, i);
    }
    return nullptr;
}

}  // namespace

std::vector<ggml_backend_buffer_type_t> cpu_extra_buffer_types() {
    std::vector<ggml_backend_buffer_type_t> out;
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!cpu) return out;
    auto get = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(cpu),
                                                                                      "ggml_backend_dev_get_extra_bufts");
    for (ggml_backend_buffer_type_t * b = get ? get(cpu) : nullptr; b && *b; ++b) out.push_back(*b);
    return out;
}

bool is_cpu_extra_buffer_type(ggml_backend_buffer_type_t buft) {
    const auto extra = cpu_extra_buffer_types();
    return std::find(extra.begin(), extra.end(), buft) != extra.end();
}

bool projector::kernel_reads(const llama_model * model, const switches & env) {
    const ggml_tensor * out = model->output ? model->output : model->tok_embd;
    const ggml_tensor * norm = model->output_norm;
    return out && out->buffer && ggml_backend_buffer_is_host(out->buffer) &&
           !is_cpu_extra_buffer_type(ggml_backend_buffer_get_type(out->buffer)) &&
           rowmat_available(out->type, out->ne[0]) && env.kernel_mode() != switch_mode::off && ggml_is_contiguous(out) &&
           (!norm || (norm->type == GGML_TYPE_F32 && norm->buffer && ggml_backend_buffer_is_host(norm->buffer)));
}

projector::projector(const llama_model * model, const switches & env) {
    output_ = model->output ? model->output : model->tok_embd;
    if (!output_ || !output_->buffer) throw error("this model has no output matrix to project layers with");
    if (model->output_b) throw error("early exit is not supported for models with an output bias");
    output_norm_ = model->output_norm;
    norm_eps_ = model->hparams.f_norm_rms_eps;
    norm_supported_ = output_norm_ && !model->output_norm_b && final_norm_is_rms(model->arch);
    n_embd_ = (int32_t) output_->ne[0];
    n_vocab_ = output_->ne[1];

    // Graphs whose logits are exactly output @ result_norm (src/models/<arch>.cpp).
    can_fuse_final_ = norm_supported_ && model->output_s == nullptr &&
                      (model->arch == LLM_ARCH_LLAMA || model->arch == LLM_ARCH_QWEN2 || model->arch == LLM_ARCH_QWEN3 ||
                       (model->arch == LLM_ARCH_GEMMA3 && model->hparams.f_final_logit_softcapping == 0.0f));

    // Run where the weights live. A GPU's own buffers are computed on that GPU; everything else
    // on the CPU backend: plain host memory (CPU, CUDA_Host pinned memory, whose device is the
    // GPU although the GPU does not compute on it) and the CPU's extra buffer types (AMX,
    // CPU_REPACK, KleidiAI), whose repacked layouts only the CPU backend's kernels for them read.
    ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(output_->buffer);
    const std::string buft_name = ggml_backend_buft_name(buft);
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    if (dev != nullptr && ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU && ggml_backend_dev_supports_buft(dev, buft)) {
        backend_.reset(ggml_backend_dev_init(dev, nullptr));
    } else {
        const bool host = ggml_backend_buffer_is_host(output_->buffer);
        const bool extra = is_cpu_extra_buffer_type(buft);
        if (!host && !extra) {
            throw error("the output matrix is in a " + buft_name + " buffer, which the early-exit projection cannot read; " +
                        "load the model with repack=False (CLI: --no-repack)");
        }
        backend_.reset(ggml_backend_cpu_init());
        is_cpu_ = true;
        plain_host_ = host && !extra;
    }
    if (!backend_) throw error("could not initialise a backend for the output matrix (" + buft_name + ")");
    backend_name_ = ggml_backend_name(backend_.get());
    // the allocators and graphs are members: if a check below throws, they and the backend are freed
    galloc_.reset(ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_.get())));

    // Weights of a type our kernels know (Q8_0, Q6_K, Q4_K, F16, BF16) in plain host memory can
    // use them. switches::kernel: auto (default: whichever of ours and ggml's measures faster),
    // on (always ours), off (never).
    const switch_mode kernel_mode = env.kernel_mode();
    rowmat_always_ = kernel_mode == switch_mode::on;
    use_rowmat_ = plain_host_ && kernel_reads(model, env);
    if (use_rowmat_) {
        backend_name_ = std::string("CPU (dola-cpp's ") + ggml_type_name(output_->type) + " kernel, " + rowmat_isa() +
                        (rowmat_always_ ? ")" : ", or ggml's, whichever measures faster)");
    }
    backend_name_ += std::string(" [weights: ") + ggml_type_name(output_->type) + " in " + buft_name + "]";

    // switches::device_contrast: auto (default: where the backend is not the CPU, whose own
    // kernels are faster than a ggml graph), on (any backend; for tests), off.
    const switch_mode contrast_mode = env.device_contrast_mode();
    device_contrast_ = contrast_mode == switch_mode::on || (contrast_mode == switch_mode::automatic && !is_cpu_);
    if (device_contrast_) backend_name_ += " (DoLa's contrast there too)";
    galloc_d_.reset(ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_.get())));
}

void projector::set_n_threads(int32_t n_threads) {
    n_threads_ = n_threads;
    if (is_cpu_) ggml_backend_cpu_set_n_threads(backend_.get(), n_threads);
}

void projector::build(int32_t n_rows, bool norm) {
    ggml_init_params params = {
        /*.mem_size   =*/ ggml_tensor_overhead() * 8 + ggml_graph_overhead(),
        /*.mem_buffer =*/ nullptr,
        /*.no_alloc   =*/ true,
    };
    ctx_.reset(ggml_init(params));
    ggml_context * c = ctx_.get();
    built_rows_ = -1;  // until the new graph is allocated
    in_ = ggml_new_tensor_2d(c, GGML_TYPE_F32, n_embd_, n_rows);
    ggml_set_input(in_);
    ggml_tensor * x = in_;
    if (norm) {
        x = ggml_rms_norm(c, x, norm_eps_);
        x = ggml_mul(c, x, output_norm_);
    }
    out_ = ggml_mul_mat(c, output_, x);  // [n_vocab, n_rows]
    ggml_set_output(out_);
    graph_ = ggml_new_graph(c);
    ggml_build_forward_expand(graph_, out_);
    if (const ggml_tensor * node = first_unsupported(backend_.get(), graph_)) {
        throw error(std::string("the early-exit projection (") + ggml_op_desc(node) + " of a " + ggml_type_name(output_->type) +
                    " output matrix in a " + ggml_backend_buft_name(ggml_backend_buffer_get_type(output_->buffer)) +
                    " buffer) is not supported by backend " + ggml_backend_name(backend_.get()) +
                    "; load the model with repack=False (CLI: --no-repack)");
    }
    if (!ggml_gallocr_alloc_graph(galloc_.get(), graph_)) throw error("could not allocate the projection graph");
    built_rows_ = n_rows;
    built_norm_ = norm;
}

void projector::project(const float * hidden, int32_t n_rows, bool norm, float * out) {
    if (n_rows <= 0) return;
    if (norm && !norm_supported_) throw error("premature_norm is not supported for this architecture");
    if (use_rowmat_ && rowmat_faster(hidden, n_rows, norm)) {
        project_rowmat(hidden, n_rows, norm, out);
    } else {
        project_ggml(hidden, n_rows, norm, out);
    }
}

// Which of our kernel and ggml's is faster on this CPU for this many rows is measured, not
// assumed: ours shares each weight block across rows, ggml's may have better kernels for the ISA
// (each won on one machine and lost on another). Timed once per row count (up to 16 rows; more
// rows reuse the 16-row verdict) on the first rows of the first real call.
bool projector::rowmat_faster(const float * hidden, int32_t n_rows, bool norm) {
    if (rowmat_always_) return true;
    const int32_t rows = std::min(n_rows, 16);
    const int32_t key = rows * 2 + (norm ? 1 : 0);
    const auto known = rowmat_faster_.find(key);
    if (known != rowmat_faster_.end()) return known->second;
    std::vector<float> scratch((size_t) rows * n_vocab_);
    auto seconds = [&](auto && run) {
        run();  // warm: graph allocation, caches, thread start-up
        const auto t0 = std::chrono::steady_clock::now();
        run();
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    const double ours = seconds([&] { project_rowmat(hidden, rows, norm, scratch.data()); });
    const double ggml = seconds([&] { project_ggml(hidden, rows, norm, scratch.data()); });
    return rowmat_faster_[key] = ours <= ggml;
}

void projector::join_final(float * rows, int32_t n_layers, bool premature_norm, const float * final_row) {
    if (premature_norm && n_layers > 0) normalize(rows, n_layers, rows);
    std::memcpy(rows + (size_t) n_layers * n_embd_, final_row, (size_t) n_embd_ * sizeof(float));
}

void projector::normalize(const float * hidden, int32_t n_rows, float * out) {
    if (!norm_supported_) throw error("premature_norm is not supported for this architecture");
    if (norm_weight_.empty()) {
        norm_weight_.resize(n_embd_);
        ggml_backend_tensor_get(output_norm_, norm_weight_.data(), 0, (size_t) n_embd_ * sizeof(float));
    }
    const float * g = norm_weight_.data();
    for (int32_t r = 0; r < n_rows; ++r) {  // RMSNorm times the final norm weight, as the model's graph
        const float * h = hidden + (size_t) r * n_embd_;
        double ss = 0.0;
        for (int32_t i = 0; i < n_embd_; ++i) ss += (double) h[i] * h[i];
        const float scale = 1.0f / std::sqrt((float) (ss / n_embd_) + norm_eps_);
        for (int32_t i = 0; i < n_embd_; ++i) out[(size_t) r * n_embd_ + i] = h[i] * scale * g[i];
    }
}

bool projector::output_rows(const int32_t * ids, int32_t n, float * out) const {
    if (!plain_host_ || !ggml_is_contiguous(output_)) return false;
    const auto * traits = ggml_get_type_traits(output_->type);
    if (output_->type != GGML_TYPE_F32 && !traits->to_float) return false;
    for (int32_t i = 0; i < n; ++i) {
        if (ids[i] < 0 || ids[i] >= n_vocab_) throw error("token id out of range");
        const char * row = static_cast<const char *>(output_->data) + (size_t) ids[i] * output_->nb[1];
        float * dst = out + (size_t) i * n_embd_;
        if (output_->type == GGML_TYPE_F32) {
            std::memcpy(dst, row, (size_t) n_embd_ * sizeof(float));
        } else {
            traits->to_float(row, dst, n_embd_);
        }
    }
    return true;
}

void projector::project_rowmat(const float * hidden, int32_t n_rows, bool norm, float * out) {
    const float * x = hidden;
    if (norm) {
        normed_.resize((size_t) n_rows * n_embd_);
        normalize(hidden, n_rows, normed_.data());
        x = normed_.data();
    }
    rowmat(output_->type, output_->data, n_vocab_, n_embd_, output_->nb[1], x, n_rows, out, n_threads_);
}

void projector::project_ggml(const float * hidden, int32_t n_rows, bool norm, float * out) {
    // CPU matmul kernels work on tiles of 4 columns and handle remainders slowly (measured on
    // Q8_0: 7 rows cost 40% more than 8), so pad the batch with zero rows to a multiple of 4.
    const int32_t padded = (n_rows == 1 || !is_cpu_) ? n_rows : (n_rows + 3) / 4 * 4;
    if (padded != built_rows_ || norm != built_norm_) {
        build(padded, norm);
    } else if (!ggml_gallocr_alloc_graph(galloc_.get(), graph_)) {
        throw error("could not allocate the projection graph");
    }
    const size_t row_bytes = (size_t) n_embd_ * sizeof(float);
    ggml_backend_tensor_set(in_, hidden, 0, row_bytes * n_rows);
    if (padded > n_rows) {
        pad_.assign((size_t) (padded - n_rows) * n_embd_, 0.0f);
        ggml_backend_tensor_set(in_, pad_.data(), row_bytes * n_rows, row_bytes * (padded - n_rows));
    }
    if (ggml_backend_graph_compute(backend_.get(), graph_) != GGML_STATUS_SUCCESS) {
        throw error("the early-exit projection failed on backend " + backend_name_);
    }
    ggml_backend_tensor_get(out_, out, 0, (size_t) n_vocab_ * n_rows * sizeof(float));
}

// Rows [0, K) are the candidates, row K the mature one. The row max comes from argmax and a
// gather (ggml has no row-max op; log(soft_max) would lose the log-probabilities of improbable
// tokens to underflow, and DoLa's contrast reads them), then each row's log-softmax
// (z - max) - log(sum(exp(z - max))), and per candidate the JSD terms of transformers' formula,
// M (2 log M - lp - lq) with M = (p + q) / 2, summed over the vocabulary.
bool projector::build_dola(int32_t n_rows, int32_t n_groups) {
    ggml_init_params params = {
        /*.mem_size   =*/ ggml_tensor_overhead() * 64 + ggml_graph_overhead(),
        /*.mem_buffer =*/ nullptr,
        /*.no_alloc   =*/ true,
    };
    ctx_d_.reset(ggml_init(params));
    ggml_context * c = ctx_d_.get();
    const int32_t n_cand = n_rows - n_groups;
    in_d_ = ggml_new_tensor_2d(c, GGML_TYPE_F32, n_embd_, n_rows);
    cand_d_ = ggml_new_tensor_1d(c, GGML_TYPE_I32, n_cand);
    of_cand_d_ = ggml_new_tensor_1d(c, GGML_TYPE_I32, n_cand);
    mature_d_ = ggml_new_tensor_1d(c, GGML_TYPE_I32, n_groups);
    for (ggml_tensor * t : {in_d_, cand_d_, of_cand_d_, mature_d_}) ggml_set_input(t);
    ggml_tensor * z = ggml_mul_mat(c, output_, in_d_);                       // [V, R]
    ggml_tensor * idx = ggml_argmax(c, z);                                   // [R]
    ggml_tensor * zt = ggml_cont(c, ggml_transpose(c, z));                   // [R, V]
    ggml_tensor * g = ggml_get_rows(c, zt, idx);                             // [R, R]: g[., r] = z[idx_r, .]
    ggml_tensor * mx = ggml_cont(c, ggml_view_2d(c, g, 1, n_rows, g->nb[1] + g->nb[0], 0));  // [1, R] diagonal
    ggml_tensor * zs = ggml_sub(c, z, mx);
    ggml_tensor * lse = ggml_log(c, ggml_sum_rows(c, ggml_exp(c, zs)));      // [1, R]
    lp_d_ = ggml_sub(c, zs, lse);                                            // [V, R]
    ggml_set_output(lp_d_);
    ggml_tensor * p = ggml_exp(c, lp_d_);
    ggml_tensor * lpc = ggml_get_rows(c, lp_d_, cand_d_);                    // [V, C]: the candidates
    ggml_tensor * pc = ggml_get_rows(c, p, cand_d_);
    ggml_tensor * lpm = ggml_get_rows(c, lp_d_, of_cand_d_);                 // [V, C]: their mature rows
    ggml_tensor * pm = ggml_get_rows(c, p, of_cand_d_);
    ggml_tensor * m = ggml_scale(c, ggml_add(c, pc, pm), 0.5f);
    ggml_tensor * lm = ggml_log(c, ggml_clamp(c, m, 1e-30f, 3.0e38f));
    ggml_tensor * x = ggml_sub(c, ggml_sub(c, ggml_scale(c, lm, 2.0f), lpm), lpc);
    ggml_tensor * jsd = ggml_sum_rows(c, ggml_mul(c, m, x));                // [1, C]
    ggml_tensor * ent = ggml_sum_rows(c, ggml_mul(c, ggml_get_rows(c, p, mature_d_),
                                                  ggml_get_rows(c, lp_d_, mature_d_)));  // [1, G]
    sums_d_ = ggml_concat(c, jsd, ent, 1);                                  // [1, C + G]
    ggml_set_output(sums_d_);
    graph_d_ = ggml_new_graph(c);
    ggml_build_forward_expand(graph_d_, lp_d_);
    ggml_build_forward_expand(graph_d_, sums_d_);
    built_d_rows_ = n_rows;
    built_d_groups_ = n_groups;
    d_supported_ = first_unsupported(backend_.get(), graph_d_) == nullptr;
    if (!d_supported_) return false;  // the host contrast it is
    if (!ggml_gallocr_alloc_graph(galloc_d_.get(), graph_d_)) throw error("could not allocate the contrast graph");
    return true;
}

bool projector::project_dola(const float * hidden, const std::vector<int32_t> & group_rows, float * jsd,
                             double * entropy) {
    if (!device_contrast_ || group_rows.empty()) return false;
    int32_t n_rows = 0;
    for (int32_t r : group_rows) {
        if (r < 3) return false;  // at least two candidates: else the host's contrast is as cheap
        n_rows += r;
    }
    const int32_t n_groups = (int32_t) group_rows.size();
    if (n_rows != built_d_rows_ || n_groups != built_d_groups_) {
        if (!build_dola(n_rows, n_groups)) return false;
    } else if (!d_supported_) {
        return false;
    } else if (!ggml_gallocr_alloc_graph(galloc_d_.get(), graph_d_)) {
        throw error("could not allocate the contrast graph");
    }
    const int32_t n_cand = n_rows - n_groups;
    index_.resize((size_t) 2 * n_cand + n_groups);
    int32_t * cand = index_.data();
    int32_t * of_cand = cand + n_cand;
    int32_t * mature = of_cand + n_cand;
    for (int32_t gi = 0, row = 0, k = 0; gi < n_groups; row += group_rows[gi], ++gi) {
        mature[gi] = row + group_rows[gi] - 1;
        for (int32_t r = 0; r < group_rows[gi] - 1; ++r, ++k) {
            cand[k] = row + r;
            of_cand[k] = mature[gi];
        }
    }
    // queued on the backend, one wait at the end
    ggml_backend_t b = backend_.get();
    ggml_backend_tensor_set_async(b, in_d_, hidden, 0, (size_t) n_embd_ * n_rows * sizeof(float));
    ggml_backend_tensor_set_async(b, cand_d_, cand, 0, (size_t) n_cand * sizeof(int32_t));
    ggml_backend_tensor_set_async(b, of_cand_d_, of_cand, 0, (size_t) n_cand * sizeof(int32_t));
    ggml_backend_tensor_set_async(b, mature_d_, mature, 0, (size_t) n_groups * sizeof(int32_t));
    if (ggml_backend_graph_compute_async(b, graph_d_) != GGML_STATUS_SUCCESS) {
        throw error("the DoLa contrast failed on backend " + backend_name_);
    }
    sums_.resize(n_cand + n_groups);
    ggml_backend_tensor_get_async(b, sums_d_, sums_.data(), 0, sums_.size() * sizeof(float));
    ggml_backend_synchronize(b);
    for (int32_t k = 0; k < n_cand; ++k) jsd[k] = (float) (0.5 * (double) sums_[k] / (double) n_vocab_);
    for (int32_t gi = 0; gi < n_groups; ++gi) entropy[gi] = -(double) sums_[n_cand + gi];
    return true;
}

void projector::fetch_log_softmax(int32_t n, const int32_t * rows, float * const * out) {
    for (int32_t i = 0; i < n; ++i) {
        if (!lp_d_ || rows[i] < 0 || rows[i] >= built_d_rows_) throw error("internal: no such row of the contrast graph");
    }
    for (int32_t i = 0; i < n; ++i) {
        ggml_backend_tensor_get_async(backend_.get(), lp_d_, out[i], (size_t) rows[i] * lp_d_->nb[1], (size_t) n_vocab_ * sizeof(float));
    }
    ggml_backend_synchronize(backend_.get());
}

}  // namespace dola
