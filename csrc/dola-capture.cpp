#include "dola-capture.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cstring>
#include <iterator>

namespace dola {

namespace {
thread_local layer_capture * t_building = nullptr;
}  // namespace

}  // namespace dola

#ifdef DOLA_CAPTURE_HOOK
// The build links with -Wl,--wrap for these two: llama.cpp's calls come here (ggml's own stay
// unwrapped). Marking happens before ggml plans the graph's memory, so the allocator keeps the
// marked tensors (and a reserve plans for them).
extern "C" {
bool __real_ggml_backend_sched_alloc_graph(ggml_backend_sched_t sched, struct ggml_cgraph * graph);
bool __real_ggml_backend_sched_reserve(ggml_backend_sched_t sched, struct ggml_cgraph * measure_graph);

bool __wrap_ggml_backend_sched_alloc_graph(ggml_backend_sched_t sched, struct ggml_cgraph * graph) {
    if (dola::t_building) dola::t_building->mark(graph, true);
    return __real_ggml_backend_sched_alloc_graph(sched, graph);
}

bool __wrap_ggml_backend_sched_reserve(ggml_backend_sched_t sched, struct ggml_cgraph * measure_graph) {
    if (dola::t_building) dola::t_building->mark(measure_graph, false);
    return __real_ggml_backend_sched_reserve(sched, measure_graph);
}
}
#endif

namespace dola {

const char * layer_capture::capture_mode(bool callback) {
#ifdef DOLA_CAPTURE_HOOK
    return callback ? "callback" : "outputs";
#else
    (void) callback;
    return "callback";
#endif
}

layer_capture::layer_capture(int32_t n_layer, int32_t n_embd, bool callback)
    : n_layer_(n_layer), n_embd_(n_embd), slot_of_layer_(n_layer + 1, -1),
      outputs_(std::strcmp(capture_mode(callback), "outputs") == 0), tensor_of_(n_layer + 1, nullptr) {}

layer_capture::building::building(layer_capture & c) : prev_(t_building) { t_building = &c; }
layer_capture::building::~building() { t_building = prev_; }

bool layer_capture::needs_callback() const {
    if (!outputs_) return active();
    return takes_final();
}

bool layer_capture::take_new_marks() {
    std::vector<int32_t> want = layers_;
    if (context_layer_ >= 0) want.push_back(context_layer_);
    std::sort(want.begin(), want.end());
    want.erase(std::unique(want.begin(), want.end()), want.end());
    if (std::includes(marked_.begin(), marked_.end(), want.begin(), want.end())) return false;
    std::vector<int32_t> both;
    std::set_union(marked_.begin(), marked_.end(), want.begin(), want.end(), std::back_inserter(both));
    // grow while the marks stay within twice what is wanted (two layer sets taking turns);
    // beyond that (a sweep over layers), start again from what is wanted
    marked_ = both.size() <= 2 * want.size() + 2 ? std::move(both) : std::move(want);
    return true;
}

void layer_capture::mark(ggml_cgraph * gf, bool record) {
    if (record) std::fill(tensor_of_.begin(), tensor_of_.end(), nullptr);
    if (marked_.empty()) return;
    const int n = ggml_graph_n_nodes(gf);
    for (int i = 0; i < n; ++i) {
        ggml_tensor * t = ggml_graph_node(gf, i);
        const int32_t layer = layer_of(t);
        if (layer < 0 || !std::binary_search(marked_.begin(), marked_.end(), layer)) continue;
        // a view's memory is its source's: keep that too
        for (ggml_tensor * u = t; u; u = u->view_src) ggml_set_output(u);
        if (record) tensor_of_[layer] = t;  // the last node of that name, as the callback would see it
    }
}

void layer_capture::collect(ggml_backend_sched_t sched) {
    if (!outputs_ || !active()) return;
    std::vector<ggml_backend_t> queued;  // backends with reads queued on them
    auto read = [&](int32_t layer, int32_t slot, bool context) {
        ggml_tensor * t = layer >= 0 ? tensor_of_[layer] : nullptr;
        if (!t || !t->data) return;  // not in this graph: left unseen
        ggml_backend_t backend = ggml_backend_sched_get_tensor_backend(sched, t);
        if (copy_rows(t, slot, context, backend) && backend &&
            std::find(queued.begin(), queued.end(), backend) == queued.end()) {
            queued.push_back(backend);
        }
    };
    if (row_end_ > row_begin_) {
        for (size_t s = 0; s < layers_.size(); ++s) read(layers_[s], (int32_t) s, want_context_ && layers_[s] == context_layer_);
    }
    if (want_context_ && !context_seen_) read(context_layer_, -1, true);
    for (ggml_backend_t b : queued) ggml_backend_synchronize(b);  // one wait per backend
}

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
    n_splits_ = 0;
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
    if (!self->active()) return false;
    if (self->takes_final() && t->name[0] == 'r' && std::strcmp(t->name, "result_norm") == 0) {
        if (ask) return ++self->n_splits_, true;
        self->called_ = true;
        const int32_t n = self->n_rows();
        if (t->type != GGML_TYPE_F32 || t->ne[0] != self->n_embd_ || t->ne[1] != n || !ggml_is_contiguous(t)) {
            return true;  // compute on: llama.cpp's logits then
        }
        self->final_rows_.resize((size_t) n * self->n_embd_);
        ggml_backend_tensor_get(t, self->final_rows_.data(), 0, self->final_rows_.size() * sizeof(float));
        self->final_seen_ = true;
        return false;  // stop here: the engine computes the logits itself
    }
    if (self->outputs_) return ask ? false : true;  // the layers are read after the graph
    const int32_t layer = self->layer_of(t);
    const int32_t slot = layer < 0 || self->n_rows() <= 0 ? -1 : self->slot_of_layer_[layer];
    const bool context = self->want_context_ && layer >= 0 && layer == self->context_layer_;
    if (ask) {
        if (slot >= 0 || context) ++self->n_splits_;
        return slot >= 0 || context;
    }
    if (slot >= 0 || context) self->copy_rows(t, slot, context, nullptr);
    return true;
}

bool layer_capture::copy_rows(ggml_tensor * t, int32_t slot, bool context, ggml_backend_t backend) {
    if (t->type != GGML_TYPE_F32 || t->ne[0] != n_embd_ || !ggml_is_contiguous_rows(t)) {
        type_error_ = true;
        return false;
    }
    called_ = true;
    // backend: read on its queue (the caller waits once); none: read now
    auto get = [&](void * dst, size_t offset, size_t size) {
        if (backend) {
            ggml_backend_tensor_get_async(backend, t, dst, offset, size);
        } else {
            ggml_backend_tensor_get(t, dst, offset, size);
        }
    };
    const int32_t rows_in_t = (int32_t) t->ne[1];
    const size_t row_bytes = (size_t) n_embd_ * sizeof(float);
    auto get_rows = [&](float * dst, int32_t first, int32_t n) {
        if ((size_t) t->nb[1] == row_bytes) {  // one copy (one device transfer)
            get(dst, (size_t) first * row_bytes, row_bytes * n);
        } else {
            for (int32_t r = 0; r < n; ++r) get(dst + (size_t) r * n_embd_, (size_t) (first + r) * t->nb[1], row_bytes);
        }
    };
    if (context && rows_in_t == n_tokens_) {
        get_rows(context_data_.data(), 0, rows_in_t);
        context_seen_ = true;
    }
    if (slot < 0) return true;
    // Full tensors hold every token of the ubatch; the last block's output holds only the rows
    // that produce logits, which the engine makes exactly [row_begin, row_end).
    int32_t first;
    if (rows_in_t == n_tokens_) {
        first = row_begin_;
    } else if (rows_in_t == n_rows()) {
        first = 0;
    } else {
        return true;  // not the rows we asked for (e.g. an unexpected pruning): left unseen
    }
    get_rows(data_.data() + (size_t) slot * n_rows() * n_embd_, first, n_rows());
    seen_[slot] = 1;
    return true;
}

}  // namespace dola
