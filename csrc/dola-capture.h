// Capture of intermediate layer outputs from llama.cpp's graph.
// Layer j follows transformers' hidden_states[j]: 0 = embedding output ("embd", or "inp_scaled"
// for Gemma), j >= 1 = output of block j-1 (llama.cpp tensor "l_out-{j-1}").
//
// Two ways, chosen per context (capture_mode()):
//  - outputs: where the build links dola-cpp's hook on ggml's graph allocation (Linux, BSD), the
//    layers' tensors are marked as graph outputs when llama.cpp allocates a graph, so ggml keeps
//    them to the end of the graph; after llama_decode they are read in one go, one wait for all.
//    The graph runs whole: no splits, and one or two waits per ubatch whatever the layer count.
//  - callback: llama.cpp's eval callback (cb_eval) copies each tensor as it is computed; ggml's
//    scheduler then computes the graph in pieces and waits after each, once per layer.
// Either way the fused final row ("result_norm") is taken by the callback, which stops the graph
// there and skips llama.cpp's own LM head.
#pragma once

#include "ggml-backend.h"

#include <cstdint>
#include <string>
#include <vector>

namespace dola {

class layer_capture {
public:
    // callback: use the eval callback even where the build has the hook (switches::capture_callback)
    layer_capture(int32_t n_layer, int32_t n_embd, bool callback);

    // Layers to capture, in slot order; empty = capture nothing (the callback then costs one
    // string compare per graph node).
    void set_layers(const std::vector<int32_t> & layers);
    const std::vector<int32_t> & layers() const { return layers_; }

    // Also keep the final normed hidden state ("result_norm": the ubatch's output rows) and stop
    // the graph right after it, skipping llama.cpp's own LM head: the engine then projects it
    // itself (with the premature layers, where there are any, in one pass over the output matrix).
    void set_final(bool on) { final_ = on; }
    bool final_seen() const { return final_seen_; }
    // Output row k of the ubatch's final normed state (k < n_rows()).
    const float * final_row(int32_t k = 0) const { return final_rows_.data() + (size_t) k * n_embd_; }

    // One more layer whose output is kept at every position of a ubatch (Activation Decoding's
    // info layer), when expect() asks for it; -1 = none. Never the last block (llama.cpp prunes
    // its rows to the outputs).
    void set_context_layer(int32_t layer) { context_layer_ = layer; }
    int32_t context_layer() const { return context_layer_; }

    // Rows of the next ubatch to keep: [row_begin, row_end) of its tokens. The last block's output
    // is pruned to the rows that produce logits; rows are then taken in output order. context:
    // also keep every row of the context layer.
    void expect(int32_t n_tokens, int32_t row_begin, int32_t row_end, bool context = false);

    // Whether the ubatch of the last expect() has anything to capture (rows of the layers, the
    // final normed rows, or the context layer).
    bool active() const { return ((!layers_.empty() || final_) && row_end_ > row_begin_) || want_context_; }
    // Whether that ubatch needs the eval callback: every capture in callback mode, only the fused
    // final row in outputs mode. When not, the callback is not installed at all.
    bool needs_callback() const;

    // "outputs" where the build has the allocation hook and callback is not asked for, else
    // "callback".
    static const char * capture_mode(bool callback);
    bool outputs_mode() const { return outputs_; }

    // Outputs mode. Call before each llama_decode: true when a layer to capture is not among those
    // llama.cpp's graphs were made with as outputs, so the caller must make llama.cpp reserve and
    // rebuild them. The marks grow: layers marked and no longer captured stay marked, unread
    // (their outputs keep their memory in the compute buffer: n_batch x n_embd floats a layer),
    // so requests that take turns between two layer sets do not rebuild the graphs each time;
    // past twice the layers wanted (plus two) they start again from those wanted.
    bool take_new_marks();
    // While alive, graphs this thread has llama.cpp allocate get this capture's marks.
    class building {
    public:
        explicit building(layer_capture & c);
        ~building();
        building(const building &) = delete;
        building & operator=(const building &) = delete;

    private:
        layer_capture * prev_;
    };
    // Marks the layers' tensors of a graph being allocated as outputs; record: it is the graph
    // that llama_decode computes (not a reserve), whose tensors collect() reads.
    void mark(ggml_cgraph * gf, bool record);
    // After llama_decode: reads the rows of the ubatch of the last expect() from the marked tensors.
    void collect(ggml_backend_sched_t sched);

    // True when every layer was seen since the last expect().
    bool complete() const;
    std::string missing_layers() const;
    bool type_error() const { return type_error_; }

    // The context layer's rows of the last ubatch, [n_tokens][n_embd], once seen.
    bool context_seen() const { return context_seen_; }
    const float * context_rows() const { return context_data_.data(); }

    // [slot][row][n_embd]
    const float * rows(int32_t slot) const { return data_.data() + (size_t) slot * n_rows() * n_embd_; }
    int32_t n_rows() const { return row_end_ - row_begin_; }
    int32_t n_embd() const { return n_embd_; }

    static bool callback(ggml_tensor * t, bool ask, void * user_data);
    // Whether rows were captured since the last expect().
    bool called() const { return called_; }
    // Times the callback had ggml's scheduler stop and wait since the last expect().
    int32_t n_splits() const { return n_splits_; }

private:
    // Whether the callback takes this ubatch's fused final rows.
    bool takes_final() const { return final_ && n_rows() > 0; }
    // The hidden layer a graph node outputs (transformers' numbering), or -1.
    int32_t layer_of(const ggml_tensor * t) const;
    // Copies rows [row_begin, row_end) of the ubatch (or every row, context) from a layer tensor.
    bool copy_rows(ggml_tensor * t, int32_t slot, bool context, ggml_backend_t backend);

    int32_t n_layer_;
    int32_t n_embd_;
    std::vector<int32_t> layers_;
    std::vector<int32_t> slot_of_layer_;  // n_layer + 1 entries, -1 = not captured
    std::vector<uint8_t> seen_;
    std::vector<float> data_;
    int32_t n_tokens_ = 0, row_begin_ = 0, row_end_ = 0;
    bool called_ = false;
    int32_t n_splits_ = 0;
    bool outputs_ = false;
    std::vector<int32_t> marked_;            // layers llama.cpp's graphs are made with as outputs
    std::vector<ggml_tensor *> tensor_of_;   // n_layer + 1: the marked tensors of the graph computed
    bool type_error_ = false;
    bool final_ = false;
    bool final_seen_ = false;
    std::vector<float> final_rows_;
    int32_t context_layer_ = -1;
    bool want_context_ = false;
    bool context_seen_ = false;
    std::vector<float> context_data_;
};

}  // namespace dola
