#include "dola-capture.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cstring>

namespace dola {

layer_capture::layer_capture(int32_t n_layer, int32_t n_embd)
    : n_layer_(n_layer), n_embd_(n_embd), slot_of_layer_(n_layer + 1, -1) {}

void layer_capture::set_layers(const std::vector<int32_t> & layers) {
    std::fill(slot_of_layer_.begin(), slot_of_layer_.end(), -1);
    layers_ = layers;
    for (size_t s = 0; s < layers_.size(); ++s) slot_of_layer_[layers_[s]] = (int32_t) s;
    seen_.assign(layers_.size(), 0);
}

void layer_capture::expect(int32_t n_tokens, int32_t row_begin, int32_t row_end, bool context) {
    n_tokens_ = n_tokens;
    want_context_ = context && context_layer_ >= 0;
    context_seen_ = false;
    if (want_context_ && context_data_.size() < (size_t) n_tokens * n_embd_) context_data_.resize((size_t) n_tokens * n_embd_);
    row_begin_ = row_begin;
    row_end_ = row_end;
    called_ = false;
    std::fill(seen_.begin(), seen_.end(), 0);
    type_error_ = false;
    final_seen_ = false;
    const size_t need = layers_.size() * (size_t) n_rows() * n_embd_;
    if (data_.size() < need) data_.resize(need);
}

bool layer_capture::complete() const {
    return std::all_of(seen_.begin(), seen_.end(), [](uint8_t s) { return s != 0; }) && !type_error_;
}

std::string layer_capture::missing_layers() const {
    std::string out;
    for (size_t s = 0; s < layers_.size(); ++s) {
        if (!seen_[s]) out += (out.empty() ? "" : ", ") + std::to_string(layers_[s]);
    }
    return out;
}

// Called for every graph node in the ask phase: keep it to a couple of byte compares.
int32_t layer_capture::layer_of(const ggml_tensor * t) const {
    const char * name = t->name;
    if (name[0] == 'l' && std::strncmp(name, "l_out-", 6) == 0) {
        int32_t il = 0;
        const char * p = name + 6;
        if (*p < '0' || *p > '9') return -1;
        for (; *p >= '0' && *p <= '9'; ++p) il = il * 10 + (*p - '0');
        if (*p != '\0' || il + 1 > n_layer_) return -1;
        return il + 1;
    }
    // Layer 0: "embd" (older llama.cpp: "inp_embd"); Gemma's "inp_scaled" follows it in the graph
    // and overwrites it.
    if ((name[0] == 'e' && std::strcmp(name, "embd") == 0) ||
        (name[0] == 'i' && (std::strcmp(name, "inp_scaled") == 0 || std::strcmp(name, "inp_embd") == 0))) {
        return 0;
    }
    return -1;
}

bool layer_capture::callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * self = static_cast<layer_capture *>(user_data);
    self->called_ = true;
    if (!self->active()) return false;
    if (self->final_ && self->n_rows() == 1 && t->name[0] == 'r' && std::strcmp(t->name, "result_norm") == 0) {
        if (ask) return true;
        if (t->type != GGML_TYPE_F32 || t->ne[0] != self->n_embd_ || t->ne[1] != 1) return true;  // compute on
        self->final_row_.resize(self->n_embd_);
        ggml_backend_tensor_get(t, self->final_row_.data(), 0, (size_t) self->n_embd_ * sizeof(float));
        self->final_seen_ = true;
        return false;  // stop here: the engine computes the logits itself
    }
    const int32_t layer = self->layer_of(t);
    const int32_t slot = layer < 0 || self->n_rows() <= 0 ? -1 : self->slot_of_layer_[layer];
    const bool context = self->want_context_ && layer >= 0 && layer == self->context_layer_;
    if (ask) return slot >= 0 || context;
    if (slot < 0 && !context) return true;
    if (t->type != GGML_TYPE_F32 || t->ne[0] != self->n_embd_ || !ggml_is_contiguous_rows(t)) {
        self->type_error_ = true;
        return true;
    }
    const int32_t rows_in_t = (int32_t) t->ne[1];
    const size_t row_bytes = (size_t) self->n_embd_ * sizeof(float);
    if (context && rows_in_t == self->n_tokens_) {
        if ((size_t) t->nb[1] == row_bytes) {  // one copy (one device transfer) for the ubatch
            ggml_backend_tensor_get(t, self->context_data_.data(), 0, row_bytes * rows_in_t);
        } else {
            for (int32_t r = 0; r < rows_in_t; ++r) {
                ggml_backend_tensor_get(t, self->context_data_.data() + (size_t) r * self->n_embd_, (size_t) r * t->nb[1], row_bytes);
            }
        }
        self->context_seen_ = true;
    }
    if (slot < 0) return true;
    // Full tensors hold every token of the ubatch; the last block's output holds only the rows
    // that produce logits, which the engine makes exactly [row_begin, row_end).
    int32_t first;
    if (rows_in_t == self->n_tokens_) {
        first = self->row_begin_;
    } else if (rows_in_t == self->n_rows()) {
        first = 0;
    } else {
        return true;  // not the rows we asked for (e.g. an unexpected pruning): left unseen
    }
    float * dst = self->data_.data() + (size_t) slot * self->n_rows() * self->n_embd_;
    for (int32_t r = 0; r < self->n_rows(); ++r) {
        ggml_backend_tensor_get(t, dst + (size_t) r * self->n_embd_, (size_t) (first + r) * t->nb[1], row_bytes);
    }
    self->seen_[slot] = 1;
    return true;
}

}  // namespace dola
