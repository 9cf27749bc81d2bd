// Many generations in one llama.cpp context: continuous batching. Each request is a sequence with
// a KV stream of its own; each step, one llama_decode carries every running sequence's next token,
// the prompts of sequences that joined are decoded in chunks in the same step, and the captured
// rows of every sequence that needs them go through the output matrix in one projection. Each sequence keeps its own decoder
// (plain, DoLa with its own layers, Activation Decoding), premature-layer choice, penalty history,
// sampler and seed: its tokens are those it would get alone. The decoding runs on the engine's own
// thread; callers submit requests and take their steps as they come. Knows no Python.
#pragma once

#include "decoders/decoder.h"
#include "dola-answer.h"
#include "dola-capture.h"
#include "dola-context-entropy.h"
#include "dola-model.h"
#include "dola-project.h"
#include "dola-sampler.h"
#include "dola-threads.h"
#include "dola-types.h"

#include "llama-cpp.h"

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace dola {

struct batch_request {
    std::vector<llama_token> prompt;
    decode_params params;
    answer_rules answer;  // when the answer ends (tokens, stop strings, risk, loops)
    std::vector<float> eos_bonus;  // added to the end tokens' scores when choosing token i (missing: 0)
};

// What a request's consumer takes, in order: its steps (each with the text it lets through; the
// last with the reason the answer ended), then one end (or failed, with the reason).
struct batch_event {
    enum kind_t { step, end, failed };
    kind_t kind = step;
    step_result result;
    std::string error;
};

struct batch_stats {
    int32_t n_running = 0, n_queued = 0;
    int64_t n_decodes = 0;          // llama_decode calls
    int64_t n_decoded_tokens = 0;   // tokens they carried (prompt chunks and answers)
    int64_t n_steps = 0;            // tokens chosen
    int64_t n_projections = 0;      // calls of the output-matrix projection
    int64_t n_fused = 0;            // steps whose final logits came from that projection, not llama.cpp's
    int64_t n_device_contrasts = 0;  // of those, DoLa steps whose contrast ran where the projection did
    int64_t n_cache_hits = 0;       // requests that started from a saved prompt (the prompt cache)
    int64_t n_cache_tokens = 0;     // prompt tokens those restores spared
    int64_t cache_bytes = 0;        // what the prompt cache holds now
    int32_t cache_entries = 0;
    double decode_ms = 0.0, step_ms = 0.0;
};

class batch_engine {
public:
    // params.n_ctx: positions per sequence (the cache holds n_seq times as many).
    // cache_bytes: host memory for the prompt cache. A sequence about to be overwritten saves its
    // KV cells (with its tokens) there first; a request whose prompt shares a longer prefix with a
    // saved entry than with any free sequence starts from that entry's cells (the same bytes at the
    // same positions: its results are unchanged), least recently used entries dropped beyond the
    // budget. 0, or a model whose memory cannot be cut back to a prefix (recurrent, hybrid,
    // sliding-window): no cache.
    batch_engine(std::shared_ptr<model> mdl, const context_params & params, int32_t n_seq, size_t cache_bytes = 0);
    ~batch_engine();
    batch_engine(const batch_engine &) = delete;
    batch_engine & operator=(const batch_engine &) = delete;

    int32_t n_seq() const { return n_seq_; }
    uint32_t n_ctx() const { return n_ctx_seq_; }  // per sequence
    int32_t n_threads() const { return n_threads_; }
    bool adaptive_threads() const { return governor_.adaptive(); }
    const model & get_model() const { return *model_; }

    // Throws dola::error when prompt is empty or holds an id outside the vocabulary, and
    // prompt_too_long when it has more tokens than a sequence holds: what submit checks first.
    void check_prompt(const std::vector<llama_token> & prompt) const;
    // Checks the request (prompt, layers, sampling values, grammar) and queues it: it starts as
    // soon as a sequence is free. Throws dola::error (prompt_too_long) before anything runs.
    int64_t submit(batch_request req);
    // The request's next event, waiting at most timeout_ms; false when none came in that time.
    bool next(int64_t id, batch_event & out, int32_t timeout_ms);
    // Stops the request (queued or running) and forgets it; its sequence serves the next request.
    void release(int64_t id);
    batch_stats stats();

private:
    struct job;
    struct slot {
        std::vector<llama_token> tokens;  // what the KV cache holds for this sequence
        std::unique_ptr<context_entropy> context;  // Activation Decoding's rows of those tokens
        job * active = nullptr;
        uint64_t last_admit = 0;  // when it last took a request (0: never)
    };
    struct job {
        int64_t id = 0;
        batch_request req;
        std::unique_ptr<decoder> dec;
        std::unique_ptr<sampler> smp;
        std::unique_ptr<answer_text> answer;
        std::vector<int32_t> layers;  // projected per output row: the decoder's, then an early-exit mature layer
        int32_t mature = 0;
        int32_t ctx_layer = -1;
        int32_t slot = -1;
        size_t n_prompt_done = 0;  // prompt tokens in the cache
        int32_t n_chosen = 0;
        llama_token pending = -1;  // chosen, to be decoded next
        bool finished = false;     // no more steps (ended or failed); engine thread
        bool released = false;     // under mu_, with events
        std::deque<batch_event> events;
        // its logits may come from dola-cpp's projection of its final normed row (with its layers'
        // rows), when every sequence of a call fuses (fuses_final)
        bool fuses = false;
        // this iteration's output: its layers' rows, then either the final logits or (fused) the
        // final normed row; its rows in the projection
        std::vector<float> hidden, logits, final_row;
        bool fused = false;
        size_t proj_offset = 0;
        // this iteration's contrast ran where the projection did (projector::project_dola): its
        // rows there start at dev_row, its JSD values in dev_jsd_ at dev_jsd
        bool on_device = false;
        int32_t dev_row = 0, dev_jsd = 0, dev_group = 0;
    };

    void loop();
    bool abort_requested() const { return stop_.load(std::memory_order_relaxed); }
    static bool abort_cb(void * data);
    projector & need_projector();
    // engine thread: the step's DoLa contrasts where the projection's backend can run them (sets
    // each such job's on_device)
    void project_on_device(std::vector<job *> & outputs);
    // engine thread: appends a job's rows to hidden_ for the projection: its layers' rows, then
    // (fused) its final normed row (projector::join_final)
    void append_rows(const job & j);
    // engine thread: puts a queued job on a free sequence (the one sharing the longest prefix),
    // first restoring the prompt cache's entry `entry` into it when not null
    struct cached_prompt {
        std::vector<llama_token> tokens;
        std::vector<uint8_t> state;  // llama_state_seq_get_data of those tokens' cells
    };
    using cache_entry = std::list<cached_prompt>::iterator;
    void admit(job & j, int32_t s, cache_entry entry);
    static size_t entry_bytes(const cached_prompt & e) { return e.state.size() + e.tokens.size() * sizeof(llama_token); }
    // engine thread: saves sequence s's cells and tokens (unless an entry already holds them)
    void save_prompt(int32_t s);
    void trim_cache();  // least recently used entries out until the cache fits its budget
    // the entry sharing the longest prefix with prompt (counting at most max_len tokens), or end()
    cache_entry best_cached(const std::vector<llama_token> & prompt, size_t max_len, size_t & common);
    // engine thread: one step of every running job (llama_decode calls, one projection, their
    // decoders and samplers)
    void iterate(std::vector<job *> & work);
    struct call_token {
        llama_token token;
        llama_pos pos;
        int32_t seq;
    };
    // One llama_decode of toks, outputs from row_begin on, with the capture; false (last_error_)
    // when it fails.
    // fuse: every output row's job fuses (the capture takes the final normed rows and stops the
    // graph before llama.cpp's output matrix).
    bool decode_call(const std::vector<call_token> & toks, int32_t row_begin, bool context, bool fuse = false);
    void take_output(job & j, int32_t k, int32_t batch_index);
    // engine thread, without the lock: the outputs' projections, decoders and samplers
    void step_outputs(std::vector<job *> & outputs);
    // engine thread: j's next event (handed to its consumer at the end of the iteration)
    void emit(job & j, batch_event ev);
    void fail(job & j, const std::string & why);

    std::shared_ptr<model> model_;
    switches env_;
    llama_context_ptr ctx_;
    int32_t n_seq_;
    uint32_t n_ctx_seq_ = 0, n_batch_ = 0;
    int32_t n_threads_ = 1;
    thread_governor governor_;
    int32_t threads_now_ = 1;  // fewer than n_threads_ while other processes keep cores busy
    int32_t projector_threads_ = 0;
    void update_threads();
    bool capture_enabled_ = true;
    layer_capture capture_;
    std::vector<int32_t> marked_layers_;  // the union of the running jobs' layers, captured for all
    std::unique_ptr<projector> projector_;
    std::vector<slot> slots_;
    // the prompt cache, most recently used first (engine thread, under mu_)
    std::list<cached_prompt> cache_;
    size_t cache_limit_ = 0, cache_bytes_ = 0;

    std::mutex mu_;
    std::condition_variable work_cv_, event_cv_;
    std::map<int64_t, std::unique_ptr<job>> jobs_;
    std::deque<job *> queue_;
    int64_t next_id_ = 1;
    uint64_t n_admitted_ = 0;
    batch_stats stats_;
    // engine thread's counts, added to stats_ under the lock
    int64_t n_projections_ = 0, n_fused_ = 0, n_device_contrasts_ = 0, n_decodes_ = 0, n_decoded_tokens_ = 0;
    double step_ms_ = 0.0, decode_ms_ = 0.0;
    std::string last_error_;
    std::atomic<bool> stop_{false};
    std::thread thread_;

    // engine-thread scratch
    std::vector<std::pair<job *, batch_event>> emitted_;
    std::vector<float> hidden_, proj_, lp_, scores_, chosen_lp_, mature_copy_, dev_jsd_;
    std::vector<double> dev_entropy_;
};

}  // namespace dola
