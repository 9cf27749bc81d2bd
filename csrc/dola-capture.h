// Capture of intermediate layer outputs through llama.cpp's eval callback (cb_eval).
// Layer j follows transformers' hidden_states[j]: 0 = embedding output ("embd", or "inp_scaled"
// for Gemma), j >= 1 = output of block j-1 (llama.cpp tensor "l_out-{j-1}").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct ggml_tensor;

namespace dola {

class layer_capture {
public:
    layer_capture(int32_t n_layer, int32_t n_embd);

    // Layers to capture, in slot order; empty = capture nothing (the callback then costs one
    // string compare per graph node).
    void set_layers(const std::vector<int32_t> & layers);
    const std::vector<int32_t> & layers() const { return layers_; }

    // Also keep the final normed hidden state ("result_norm", one row) and stop the graph right
    // after it, skipping llama.cpp's own LM head: the engine then projects it together with the
    // premature layers in one pass over the output matrix.
    void set_final(bool on) { final_ = on; }
    bool final_seen() const { return final_seen_; }
    const float * final_row() const { return final_row_.data(); }

    // One more layer whose output is kept at every position of a ubatch (Activation Decoding's
    // info layer), when expect() asks for it; -1 = none. Never the last block (llama.cpp prunes
    // its rows to the outputs).
    void set_context_layer(int32_t layer) { context_layer_ = layer; }
    int32_t context_layer() const { return context_layer_; }

    // Rows of the next ubatch to keep: [row_begin, row_end) of its tokens. The last block's output
    // is pruned to the rows that produce logits; rows are then taken in output order. context:
    // also keep every row of the context layer.
    void expect(int32_t n_tokens, int32_t row_begin, int32_t row_end, bool context = false);

    // Whether the ubatch of the last expect() has anything to capture (rows of the layers, or the
    // context layer); when not, the callback need not be installed at all.
    bool active() const { return (!layers_.empty() && row_end_ > row_begin_) || want_context_; }

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
    // Whether llama.cpp called the callback since the last expect().
    bool called() const { return called_; }

private:
    // The hidden layer a graph node outputs (transformers' numbering), or -1.
    int32_t layer_of(const ggml_tensor * t) const;

    int32_t n_layer_;
    int32_t n_embd_;
    std::vector<int32_t> layers_;
    std::vector<int32_t> slot_of_layer_;  // n_layer + 1 entries, -1 = not captured
    std::vector<uint8_t> seen_;
    std::vector<float> data_;
    int32_t n_tokens_ = 0, row_begin_ = 0, row_end_ = 0;
    bool called_ = false;
    bool type_error_ = false;
    bool final_ = false;
    bool final_seen_ = false;
    std::vector<float> final_row_;
    int32_t context_layer_ = -1;
    bool want_context_ = false;
    bool context_seen_ = false;
    std::vector<float> context_data_;
};

}  // namespace dola
