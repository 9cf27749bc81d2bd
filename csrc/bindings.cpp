// The one Python binding file: wraps the C++ core (dola-engine.h) for dola_cpp/_core.
#include "dola-engine.h"
#include "dola-rowmat.h"

#include "ggml-backend.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cctype>
#include <memory>
#include <optional>
#include <type_traits>

namespace py = pybind11;

namespace {

template <typename T>
py::array_t<T> to_array(std::vector<T> && v, std::vector<py::ssize_t> shape) {
    auto * heap = new std::vector<T>(std::move(v));
    py::capsule owner(heap, [](void * p) { delete static_cast<std::vector<T> *>(p); });
    return py::array_t<T>(shape, heap->data(), owner);
}

// GGUF strings and llama.cpp messages are untrusted bytes: decode them with U+FFFD replacement
// instead of letting pybind11 raise UnicodeDecodeError.
py::str lenient_str(const std::string & s) {
    PyObject * o = PyUnicode_DecodeUTF8(s.data(), (Py_ssize_t) s.size(), "replace");
    if (!o) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(o);
}

void set_error(PyObject * type, const char * what) {
    py::str msg = lenient_str(what);
    PyErr_SetObject(type, msg.ptr());
}

// Token ids from Python (a 1-D array or sequence of integers) as llama.cpp's int32. The model
// checks them where they are used; an id that does not even fit in int32 is outside every
// vocabulary, and the model's message says so with the id as given.
std::vector<int32_t> to_tokens(const dola::model & m, py::handle ids) {
    using int64_array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
    std::vector<int32_t> out;
    if (int64_array a = int64_array::ensure(ids)) {
        if (a.ndim() != 1) throw py::value_error("token ids must be a 1-D sequence of integers");
        out.resize(a.size());
        const int64_t * d = a.data();
        for (py::ssize_t i = 0; i < a.size(); ++i) {
            if (d[i] < INT32_MIN || d[i] > INT32_MAX) m.check_token(d[i]);  // throws
            out[i] = (int32_t) d[i];
        }
        return out;
    }
    // numpy could not make int64s of them: ids beyond 64 bits, or not integers at all
    for (py::handle item : py::iter(ids)) {
        if (!PyLong_Check(item.ptr())) throw py::type_error("token ids must be integers");
        int overflow = 0;
        const long long v = PyLong_AsLongLongAndOverflow(item.ptr(), &overflow);
        if (overflow == 0 && v >= INT32_MIN && v <= INT32_MAX) {
            out.push_back((int32_t) v);
            continue;
        }
        throw dola::error(m.outside_vocabulary(py::str(item)));
    }
    return out;
}

// A session plus the Python-side interrupt plumbing: while llama.cpp computes without the GIL,
// the abort callback briefly takes the GIL every ~20 ms to run Python's signal handlers, so
// Ctrl-C on the main thread stops prefill and decode; the handler's exception is re-raised.
class py_session {
public:
    py_session(std::shared_ptr<dola::model> m, const dola::context_params & p)
        : sp(make(std::move(m), p)), s(*sp) {
        s.set_interrupt_check([this] { return interrupted(); });
    }

    bool interrupted() {
        if (PyGILState_Check()) return false;  // never re-enter while holding the GIL
        py::gil_scoped_acquire gil;
        if (PyErr_CheckSignals() != 0) {
            pending.emplace();  // fetches and clears the handler's exception
            return true;
        }
        return false;
    }

    template <typename F>
    auto run(F && f) -> decltype(f()) {
        s.reset_cancel();
        try {
            if constexpr (std::is_void_v<decltype(f())>) {
                call(f);
                raise_pending();
            } else {
                auto out = call(f);
                raise_pending();
                return out;
            }
        } catch (const dola::aborted &) {
            raise_pending();
            throw;
        }
    }

    std::unique_ptr<dola::session> sp;
    dola::session & s;
    std::optional<py::error_already_set> pending;

private:
    // f without the GIL; with an RPC model on rpc_call's helper thread, while this (the main)
    // thread watches for Ctrl-C: it cancels the call, which stops at its next CPU step (the
    // current token, when every layer is remote).
    template <typename F>
    auto call(F && f) -> decltype(f()) {
        py::gil_scoped_release release;
        if (!s.get_model().uses_rpc()) return f();
        auto poll = [this] { if (interrupted()) s.cancel(); };
        if constexpr (std::is_void_v<decltype(f())>) {
            s.get_model().call([&] { f(); }, poll);
        } else {
            std::optional<decltype(f())> out;
            s.get_model().call([&] { out.emplace(f()); }, poll);
            return std::move(*out);
        }
    }

    // A signal handler's exception (Ctrl-C) caught while computing is raised now.
    void raise_pending() {
        if (!pending) return;
        py::error_already_set e = std::move(*pending);
        pending.reset();
        e.restore();
        throw py::error_already_set();
    }

    // When the model uses RPC, the context (its KV cache lives there) is made on rpc_call's helper thread.
    static std::unique_ptr<dola::session> make(std::shared_ptr<dola::model> m, const dola::context_params & p) {
        py::gil_scoped_release release;
        std::unique_ptr<dola::session> out;
        m->call([&] { out = std::make_unique<dola::session>(m, p); });
        return out;
    }
};

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "dola-cpp C++ core (private; use the dola_cpp package)";

    static py::exception<dola::error> dola_error(m, "Error", PyExc_ValueError);
    // carries n_tokens and n_ctx; the package raises its PromptTooLongError from it
    static py::exception<dola::prompt_too_long> dola_too_long(m, "PromptTooLong", dola_error.ptr());
    static py::exception<dola::aborted> dola_cancelled(m, "Cancelled", PyExc_RuntimeError);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const dola::prompt_too_long & e) {
            py::object exc = py::handle(dola_too_long.ptr())(lenient_str(e.what()));
            exc.attr("n_tokens") = e.n_tokens;
            exc.attr("n_ctx") = e.n_ctx;
            PyErr_SetObject(dola_too_long.ptr(), exc.ptr());
        } catch (const dola::error & e) {
            set_error(dola_error.ptr(), e.what());
        } catch (const dola::aborted & e) {
            set_error(dola_cancelled.ptr(), e.what());
        }
    });

    // The DOLA_CPP_* switches are read here, when a model, a context or llama.cpp's backends are
    // first made, and handed to the core.
    auto init_backends = [] { dola::backend_init_once(dola::switches::from_environment().verbose); };
    m.def("convert_model", [](const std::string & src, const std::string & dst, const std::string & type, int32_t n_threads) {
        dola::convert_model(src, dst, type, n_threads, dola::switches::from_environment().verbose);
    }, py::arg("src"), py::arg("dst"), py::arg("type") = "F32", py::arg("n_threads") = 0,
       py::call_guard<py::gil_scoped_release>());
    m.def("system_info", [init_backends] { init_backends(); return std::string(llama_print_system_info()); });
    m.def("cpu_extra_buffer_types", [init_backends] {
        init_backends();
        std::vector<std::string> names;
        for (auto * b : dola::cpu_extra_buffer_types()) names.emplace_back(ggml_backend_buft_name(b));
        return names;
    });
    m.def("rpc_available", &dola::rpc_available);
    m.def("rpc_serve", [init_backends](const std::string & host, int port, int n_threads, const std::string & cache_dir) {
        init_backends();
        py::gil_scoped_release release;
        dola::rpc_serve(host, port, n_threads, cache_dir);
    }, py::arg("host"), py::arg("port"), py::arg("n_threads") = 1, py::arg("cache_dir") = "");
    m.def("json_schema_to_grammar", [](const std::string & schema_json) {
        py::gil_scoped_release release;
        return dola::json_schema_grammar(schema_json);
    }, py::arg("schema_json"), "The GBNF grammar (llama.cpp's converter) of the JSON texts a JSON schema describes; "
       "ValueError names what it does not support");
    m.def("amx_build_note", [] { return std::string(DOLA_AMX_NOTE); });
    m.def("capture_mode", [] {
        return std::string(dola::layer_capture::capture_mode(dola::switches::from_environment().capture_callback));
    }, "How a context made now takes layer outputs from llama.cpp's graph: 'outputs' (kept as graph "
       "outputs, read after the graph) or 'callback' (llama.cpp's eval callback; DOLA_CPP_CAPTURE=callback, "
       "or builds without the linker hook)");

    // Vector kernels, exposed for the tests' numpy reference checks and the benchmarks.
    py::module_ k = m.def_submodule("kernels", "the contrast kernels (for tests and benchmarks)");
    using farr = py::array_t<float, py::array::c_style | py::array::forcecast>;
    k.def("log_softmax", [](farr z) {
        std::vector<float> out(z.size());
        dola::log_softmax(z.data(), out.data(), z.size());
        return to_array(std::move(out), {z.size()});
    }, py::arg("z"));
    k.def("jsd", [](farr lp, farr lq) {
        if (lp.size() != lq.size()) throw py::value_error("lp and lq differ in length");
        return dola::jsd(lp.data(), lq.data(), lp.size());
    }, py::arg("lp"), py::arg("lq"));
    k.def("dola_step", [](farr z_mature, farr z_cand, double relative_top, int32_t n_threads) {
        if (z_cand.ndim() != 2 || z_cand.shape(1) != z_mature.size()) throw py::value_error("z_cand must be [K, n_vocab]");
        const int64_t n = z_mature.size();
        const int32_t K = (int32_t) z_cand.shape(0);
        if (K < 1) throw py::value_error("need at least one candidate");
        std::vector<float> cand(z_cand.data(), z_cand.data() + z_cand.size()), lp(n), scores(n);
        dola::contrast_result r = dola::dola_step(z_mature.data(), cand.data(), K, n, relative_top, lp.data(), scores.data(),
                                                  n_threads);
        return py::make_tuple(r.premature_index, to_array(std::move(r.jsd), {(py::ssize_t) r.jsd.size()}),
                              to_array(std::move(scores), {n}));
    }, py::arg("z_mature"), py::arg("z_cand"), py::arg("relative_top") = 0.1, py::arg("n_threads") = 1);
    k.def("repetition_penalty", [](farr scores, py::array_t<int32_t, py::array::c_style | py::array::forcecast> ids, float penalty) {
        std::vector<float> out(scores.data(), scores.data() + scores.size());
        dola::repetition_penalty(out.data(), out.size(), ids.data(), ids.size(), penalty);
        return to_array(std::move(out), {scores.size()});
    }, py::arg("scores"), py::arg("ids"), py::arg("penalty"));
    k.def("lm_score_diff", [](farr lp, farr lq, bool post_softmax, double relative_top, float mask_value) {
        std::vector<float> out(lp.size());
        dola::lm_score_diff(lp.data(), lq.data(), lp.size(), post_softmax, relative_top, mask_value, out.data());
        return to_array(std::move(out), {lp.size()});
    }, py::arg("lp"), py::arg("lq"), py::arg("post_softmax"), py::arg("relative_top"), py::arg("mask_value"));
    k.def("position_entropy", [](farr z, int32_t chunk, int32_t n_threads) {
        if (z.ndim() != 2) throw py::value_error("z must be [n_positions, n_vocab]");
        if (chunk < 1) throw py::value_error("chunk must be >= 1");
        const int64_t P = z.shape(0), V = z.shape(1);
        dola::position_entropy acc;
        acc.reset(V);
        for (int64_t p = 0; p < P; p += chunk) {
            acc.add(z.data() + p * V, (int32_t) std::min<int64_t>(chunk, P - p), n_threads);
        }
        std::vector<float> out(V);
        acc.entropy(out.data());
        return to_array(std::move(out), {(py::ssize_t) V});
    }, py::arg("z"), py::arg("chunk") = 64, py::arg("n_threads") = 1,
       "Activation Decoding's entropy over positions (axis 0) per vocabulary entry, streamed in chunks.");

    k.def("rowmat_isa", [] { return std::string(dola::rowmat_isa()); },
          "The instruction set of the projection kernels ('' where the build has none).");
    k.def("rowmat", [](const std::string & type_name, py::array_t<uint8_t, py::array::c_style> w, int64_t n_in, farr x,
                       int32_t n_threads) {
        auto upper = [](std::string s) {
            for (char & c : s) c = (char) std::toupper((unsigned char) c);
            return s;
        };
        int type = 0;  // ggml's names are lower case (q8_0, bf16)
        while (type < GGML_TYPE_COUNT && (ggml_get_type_traits((ggml_type) type)->blck_size == 0 ||
                                          upper(type_name) != upper(ggml_type_name((ggml_type) type)))) {
            ++type;
        }
        if (type == GGML_TYPE_COUNT) throw py::value_error("unknown ggml type " + type_name);
        if (!dola::rowmat_available((ggml_type) type, n_in)) {
            throw py::value_error("no projection kernel for " + type_name + " rows of " + std::to_string(n_in) + " in this build");
        }
        const size_t row_bytes = ggml_row_size((ggml_type) type, n_in);
        if (w.ndim() != 2 || (size_t) w.shape(1) != row_bytes) {
            throw py::value_error("w must be [n_out, " + std::to_string(row_bytes) + "] bytes");
        }
        if (x.ndim() != 2 || x.shape(1) != n_in) throw py::value_error("x must be [n_rows, n_in]");
        const int64_t n_out = w.shape(0);
        const int32_t n_rows = (int32_t) x.shape(0);
        std::vector<float> y((size_t) n_rows * n_out);
        {
            py::gil_scoped_release release;
            dola::rowmat((ggml_type) type, w.data(), n_out, n_in, row_bytes, x.data(), n_rows, y.data(), n_threads);
        }
        return to_array(std::move(y), {n_rows, (py::ssize_t) n_out});
    }, py::arg("type"), py::arg("w"), py::arg("n_in"), py::arg("x"), py::arg("n_threads") = 1,
       "x @ W.T for a weight matrix W in one of ggml's block types (raw bytes, a row of blocks per output).");

    py::class_<dola::model, std::shared_ptr<dola::model>>(m, "Model")
        .def(py::init([](const std::string & path, int32_t n_gpu_layers, bool use_mmap, bool repack,
                         std::vector<std::string> rpc, bool no_host) {
                 dola::model_params p;
                 p.n_gpu_layers = n_gpu_layers;
                 p.use_mmap = use_mmap;
                 p.repack = repack;
                 p.no_host = no_host;
                 p.rpc = std::move(rpc);
                 p.verbose = dola::switches::from_environment().verbose;
                 py::gil_scoped_release release;  // loading reads hundreds of MB
                 return std::make_shared<dola::model>(path, p);
             }),
             py::arg("path"), py::arg("n_gpu_layers") = -1, py::arg("use_mmap") = true, py::arg("repack") = true,
             py::arg("rpc") = std::vector<std::string>{}, py::arg("no_host") = false)
        .def_property_readonly("uses_rpc", &dola::model::uses_rpc)
        .def_property_readonly("n_layer", &dola::model::n_layer)
        .def_property_readonly("n_embd", &dola::model::n_embd)
        .def_property_readonly("n_vocab", &dola::model::n_vocab)
        .def_property_readonly("n_ctx_train", &dola::model::n_ctx_train)
        .def_property_readonly("tied_embeddings", &dola::model::tied_embeddings)
        .def_property_readonly("architecture", [](const dola::model & self) { return lenient_str(self.architecture()); })
        .def_property_readonly("description", [](const dola::model & self) { return lenient_str(self.description()); })
        .def_property_readonly("chat_template", [](const dola::model & self) { return lenient_str(self.chat_template()); })
        .def("metadata", [](const dola::model & self) {
            py::list out;
            for (const auto & [k, v] : self.metadata()) out.append(py::make_tuple(lenient_str(k), lenient_str(v)));
            return out;
        })
        .def("is_eog", &dola::model::is_eog, py::arg("token"))
        .def_property_readonly("eog_tokens", &dola::model::eog_tokens)
        .def("check_grammar", [](const dola::model & self, const std::string & grammar) {
            py::gil_scoped_release release;
            (void) dola::sampler::make_grammar(self.vocab(), grammar);
        }, py::arg("grammar"), "DolaError when llama.cpp cannot parse or use the GBNF text (start rule 'root')")
        // released: a server tokenizes a large request on a worker thread while others stream
        .def("tokenize", &dola::model::tokenize, py::arg("text"), py::arg("add_special"), py::arg("parse_special"),
             py::call_guard<py::gil_scoped_release>())
        .def("check_token", [](const dola::model & self, int64_t t) { self.check_token(t); }, py::arg("token"))
        .def("token_to_piece", [](const dola::model & self, int32_t t, bool special) {
            return py::bytes(self.token_to_piece(t, special));
        }, py::arg("token"), py::arg("special") = false)
        .def("detokenize", [](const dola::model & self, py::handle ids, bool special) {
            return py::bytes(self.detokenize(to_tokens(self, ids), special));
        }, py::arg("tokens"), py::arg("special") = false)
        .def("apply_chat_template", [](const dola::model & self, const std::vector<std::pair<std::string, std::string>> & messages,
                                       bool add_assistant, const std::string & tmpl) {
            std::string out;
            {
                py::gil_scoped_release release;
                out = self.apply_chat_template(messages, add_assistant, tmpl);
            }
            return lenient_str(out);
        }, py::arg("messages"), py::arg("add_assistant") = true, py::arg("template") = "");

    py::class_<dola::step_result>(m, "Step")
        .def(py::init([](int32_t token, float top_logprob) {
                 dola::step_result s;
                 s.token = token;
                 s.top_logprob = top_logprob;
                 return s;
             }),
             py::arg("token"), py::arg("top_logprob") = 0.0f,
             "A step that chose token (for AnswerText.add outside a generation: tests, replays)")
        .def_readonly("token", &dola::step_result::token)
        .def_readonly("premature_layer", &dola::step_result::premature_layer)
        .def_property_readonly("jsd", [](const dola::step_result & s) {
            std::vector<float> v = s.jsd;
            return to_array(std::move(v), {(py::ssize_t) s.jsd.size()});
        })
        .def_readonly("mature_logprob", &dola::step_result::mature_logprob)
        .def_readonly("score", &dola::step_result::score)
        .def_readonly("entropy", &dola::step_result::entropy)
        .def_readonly("top_logprob", &dola::step_result::top_logprob)
        .def_readonly("activation_entropy", &dola::step_result::activation_entropy)
        .def_readonly("top_tokens", &dola::step_result::top_tokens)
        .def_readonly("top_logprobs_mature", &dola::step_result::top_logprobs_mature)
        .def_readonly("dola_logprob", &dola::step_result::dola_logprob)
        .def_readonly("dola_top_tokens", &dola::step_result::dola_top_tokens)
        .def_readonly("dola_top_logprobs", &dola::step_result::dola_top_logprobs)
        .def_readonly("risk", &dola::step_result::risk)
        .def_property_readonly("piece", [](const dola::step_result & s) { return lenient_str(s.piece); })
        .def_readonly("finish", &dola::step_result::finish)
        .def_property_readonly("held", [](const dola::step_result & s) { return lenient_str(s.held); })
        .def_readonly("counted", &dola::step_result::counted)
        .def_readonly("loop", &dola::step_result::loop);

    py::class_<dola::answer_text>(m, "AnswerText")
        .def(py::init([](std::shared_ptr<dola::model> mdl, int32_t max_tokens, size_t n_prompt, size_t n_ctx,
                         bool ignore_eos, std::vector<std::string> stop, double abstain_above, bool stop_loops) {
                 dola::answer_rules r{max_tokens, ignore_eos, std::move(stop), abstain_above, stop_loops};
                 return std::make_unique<dola::answer_text>(*mdl, std::move(r), n_prompt, n_ctx);
             }),
             py::keep_alive<1, 2>(), py::arg("model"), py::arg("max_tokens"), py::arg("n_prompt"), py::arg("n_ctx"),
             py::arg("ignore_eos") = false, py::arg("stop") = std::vector<std::string>{}, py::arg("abstain_above") = 0.0,
             py::arg("stop_loops") = false)
        .def("add", &dola::answer_text::add, py::arg("step"),
             "Sets the step's risk, piece, finish, held, counted and loop for the next token of the answer")
        .def_property_readonly("finish_reason", &dola::answer_text::finish_reason);
    m.def("loop_cycle", [](const std::vector<int32_t> & tokens, int32_t repeats, bool runs) {
        return dola::loop_cycle(tokens, repeats, runs);
    }, py::arg("tokens"), py::arg("repeats") = dola::stop_loop_repeats, py::arg("runs") = true);
    m.def("token_risk", &dola::token_risk, py::arg("top_logprob"));
    m.attr("LOOP_MIN_CYCLE") = dola::loop_min_cycle;
    m.attr("LOOP_MAX_CYCLE") = dola::loop_max_cycle;
    m.attr("STOP_LOOP_REPEATS") = dola::stop_loop_repeats;
    m.attr("LOOP_RUN_SPAN") = dola::loop_run_span;
    m.attr("LOOP_RISK") = dola::loop_risk;
    m.attr("ABSTAIN_MIN_TOKENS") = dola::abstain_min_tokens;

    py::class_<dola::score_result>(m, "ScoreResult")
        .def_readonly("total", &dola::score_result::total)
        .def_readonly("token_scores", &dola::score_result::token_scores)
        .def_readonly("premature_layers", &dola::score_result::premature_layers)
        .def_readonly("mature_logprobs", &dola::score_result::mature_logprobs)
        .def_readonly("top_logprobs", &dola::score_result::top_logprobs)
        .def_readonly("entropies", &dola::score_result::entropies)
        .def_readonly("jsd", &dola::score_result::jsd)
        .def_readonly("top_tokens", &dola::score_result::top_tokens);

    py::class_<dola::decode_params>(m, "DecodeParams")
        .def(py::init<>())
        .def_readwrite("candidates", &dola::decode_params::candidates)
        .def_readwrite("mature", &dola::decode_params::mature)
        .def_readwrite("relative_top", &dola::decode_params::relative_top)
        .def_readwrite("repetition_penalty", &dola::decode_params::repetition_penalty)
        .def_readwrite("premature_norm", &dola::decode_params::premature_norm)
        .def_readwrite("activation", &dola::decode_params::activation)
        .def_readwrite("alpha", &dola::decode_params::alpha)
        .def_readwrite("info_layer", &dola::decode_params::info_layer)
        .def_readwrite("temperature", &dola::decode_params::temperature)
        .def_readwrite("top_k", &dola::decode_params::top_k)
        .def_readwrite("top_p", &dola::decode_params::top_p)
        .def_readwrite("min_p", &dola::decode_params::min_p)
        .def_readwrite("seed", &dola::decode_params::seed)
        .def_readwrite("dry_multiplier", &dola::decode_params::dry_multiplier)
        .def_readwrite("dry_base", &dola::decode_params::dry_base)
        .def_readwrite("dry_allowed_length", &dola::decode_params::dry_allowed_length)
        .def_readwrite("dry_penalty_last_n", &dola::decode_params::dry_penalty_last_n)
        .def_readwrite("dry_sequence_breakers", &dola::decode_params::dry_sequence_breakers)
        .def_readwrite("frequency_penalty", &dola::decode_params::frequency_penalty)
        .def_readwrite("presence_penalty", &dola::decode_params::presence_penalty)
        .def_readwrite("logit_bias", &dola::decode_params::logit_bias)
        .def_readwrite("grammar", &dola::decode_params::grammar)
        .def_readwrite("n_probs", &dola::decode_params::n_probs);

    py::class_<py_session>(m, "Session")
        .def(py::init([](std::shared_ptr<dola::model> mdl, uint32_t n_ctx, int32_t n_threads, uint32_t n_batch,
                         const std::string & kv_type, bool capture, bool adaptive_threads) {
                 dola::context_params p;
                 p.env = dola::switches::from_environment();
                 p.kv_type = kv_type;
                 p.capture = capture;
                 p.adaptive_threads = adaptive_threads;
                 p.n_ctx = n_ctx;
                 p.n_threads = n_threads;
                 p.n_batch = n_batch;
                 return std::make_unique<py_session>(std::move(mdl), p);
             }),
             py::arg("model"), py::arg("n_ctx") = 2048, py::arg("n_threads") = 0, py::arg("n_batch") = 512, py::arg("kv_type") = "f16", py::arg("capture") = true,
             py::arg("adaptive_threads") = true)
        .def_property_readonly("n_ctx", [](const py_session & self) { return self.s.n_ctx(); })
        .def_property_readonly("n_threads", [](const py_session & self) { return self.s.n_threads(); })
        .def_property_readonly("threads_in_use", [](const py_session & self) { return self.s.threads_in_use(); })
        .def_property_readonly("adaptive_threads", [](const py_session & self) { return self.s.adaptive_threads(); })
        .def_property_readonly("projection_backend", [](const py_session & self) { return self.s.projection_backend(); })
        .def_property_readonly("n_cached", [](const py_session & self) { return self.s.tokens().size(); })
        .def("configure", [](py_session & self, const dola::decode_params & p) { self.s.configure(p); }, py::arg("params"))
        .def("check_prompt", [](const py_session & self, py::handle ids) {
            self.s.check_prompt(to_tokens(self.s.get_model(), ids));
        }, py::arg("tokens"), "What prefill and score check first: empty, an id outside the vocabulary, "
           "longer than the context (PromptTooLong)")
        .def("prefill", [](py_session & self, py::handle ids) {
            std::vector<int32_t> toks = to_tokens(self.s.get_model(), ids);
            self.run([&] { self.s.prefill(toks); });
        }, py::arg("tokens"))
        .def("sample", [](py_session & self, float eos_bonus) { return self.run([&] { return self.s.sample(eos_bonus); }); },
             py::arg("eos_bonus") = 0.0f)
        .def("accept", [](py_session & self, int32_t t) { self.run([&] { self.s.accept(t); }); }, py::arg("token"))
        .def("run", [](py_session & self, dola::answer_text & answer, const std::vector<float> & eos_bonus, size_t first,
                       int32_t max_steps) {
            return self.run([&] { return self.s.run(answer, eos_bonus, first, max_steps); });
        }, py::arg("answer"), py::arg("eos_bonus"), py::arg("first"), py::arg("max_steps"),
           "Up to max_steps steps of the token loop in the core: sample, the answer's verdict, accept unless "
           "it ended there")
        .def("clear", [](py_session & self) { self.s.clear(); })
        .def("cancel", [](py_session & self) { self.s.cancel(); })  // any thread, GIL not needed
        .def("layer_logits", [](py_session & self, py::handle ids, std::vector<int64_t> layers, bool premature_norm,
                                bool project_final) {
            std::vector<int32_t> toks = to_tokens(self.s.get_model(), ids);
            std::vector<float> out = self.run([&] { return self.s.layer_logits(toks, layers, premature_norm, project_final); });
            const py::ssize_t nv = self.s.get_model().n_vocab();
            return to_array(std::move(out), {(py::ssize_t) layers.size(), nv});
        }, py::arg("tokens"), py::arg("layers"), py::arg("premature_norm") = false, py::arg("project_final") = false)
        .def("score", [](py_session & self, py::handle ids, size_t n_prefix, bool post_softmax, double relative_top,
                         float mask_value) {
            std::vector<int32_t> toks = to_tokens(self.s.get_model(), ids);
            return self.run([&] { return self.s.score(toks, n_prefix, post_softmax, relative_top, mask_value); });
        }, py::arg("tokens"), py::arg("n_prefix"), py::arg("post_softmax") = false, py::arg("relative_top") = 0.0,
           py::arg("mask_value") = -1000.0f)
        .def("score_batch", [](py_session & self, py::sequence texts, py::sequence n_prefix, bool post_softmax,
                               double relative_top, float mask_value) {
            if (py::len(texts) != py::len(n_prefix)) throw dola::error("texts and n_prefix differ in length");
            std::vector<dola::scored_text> v(py::len(texts));
            for (size_t i = 0; i < v.size(); ++i) {
                v[i].tokens = to_tokens(self.s.get_model(), texts[i]);
                v[i].n_prefix = n_prefix[i].cast<size_t>();
            }
            return self.run([&] { return self.s.score_batch(v, post_softmax, relative_top, mask_value); });
        }, py::arg("texts"), py::arg("n_prefix"), py::arg("post_softmax") = false, py::arg("relative_top") = 0.0,
           py::arg("mask_value") = -1000.0f)
        .def("timings", [](py_session & self) {
            const dola::timings & t = self.s.stats();
            py::dict d;
            d["prefill_ms"] = t.prefill_ms;
            d["decode_ms"] = t.decode_ms;
            d["contrast_ms"] = t.contrast_ms;
            d["n_prefill"] = t.n_prefill;
            d["n_decode"] = t.n_decode;
            d["n_captured_ubatches"] = t.n_captured_ubatches;
            d["n_capture_splits"] = t.n_capture_splits;
            d["n_graph_rebuilds"] = t.n_graph_rebuilds;
            d["n_score_rows"] = t.n_score_rows;
            return d;
        })
        .def("reset_timings", [](py_session & self) { self.s.stats() = dola::timings{}; });

    py::class_<dola::batch_engine, std::shared_ptr<dola::batch_engine>>(m, "BatchEngine")
        .def(py::init([](std::shared_ptr<dola::model> mdl, uint32_t n_ctx, int32_t n_seq, int32_t n_threads, uint32_t n_batch,
                         const std::string & kv_type, bool capture, bool adaptive_threads, double cache_mib) {
                 if (!(cache_mib >= 0.0 && cache_mib <= 1048576.0)) {
                     throw dola::error("cache_mib must be in 0..1048576, got " + std::to_string(cache_mib));
                 }
                 dola::context_params p;
                 p.env = dola::switches::from_environment();
                 p.kv_type = kv_type;
                 p.capture = capture;
                 p.adaptive_threads = adaptive_threads;
                 p.n_ctx = n_ctx;
                 p.n_threads = n_threads;
                 p.n_batch = n_batch;
                 py::gil_scoped_release release;
                 return std::make_shared<dola::batch_engine>(std::move(mdl), p, n_seq, (size_t) (cache_mib * 1048576.0));
             }),
             py::arg("model"), py::arg("n_ctx") = 2048, py::arg("n_seq") = 4, py::arg("n_threads") = 0,
             py::arg("n_batch") = 512, py::arg("kv_type") = "f16", py::arg("capture") = true,
             py::arg("adaptive_threads") = true, py::arg("cache_mib") = 0.0)
        .def_property_readonly("n_ctx", &dola::batch_engine::n_ctx)
        .def_property_readonly("adaptive_threads", &dola::batch_engine::adaptive_threads)
        .def_property_readonly("n_seq", &dola::batch_engine::n_seq)
        .def_property_readonly("n_threads", &dola::batch_engine::n_threads)
        .def("check_prompt", [](const dola::batch_engine & self, py::handle ids) {
            self.check_prompt(to_tokens(self.get_model(), ids));
        }, py::arg("tokens"), "What submit checks first: empty, an id outside the vocabulary, longer than a "
           "sequence holds (PromptTooLong)")
        .def("submit", [](dola::batch_engine & self, py::handle ids, const dola::decode_params & params, int32_t max_tokens,
                          bool ignore_eos, std::vector<float> eos_bonus, std::vector<std::string> stop,
                          double abstain_above, bool stop_loops) {
            dola::batch_request r;
            r.prompt = to_tokens(self.get_model(), ids);
            r.params = params;
            r.answer = dola::answer_rules{max_tokens, ignore_eos, std::move(stop), abstain_above, stop_loops};
            r.eos_bonus = std::move(eos_bonus);
            py::gil_scoped_release release;  // a grammar is parsed here
            return self.submit(std::move(r));
        }, py::arg("tokens"), py::arg("params"), py::arg("max_tokens"), py::arg("ignore_eos") = false,
           py::arg("eos_bonus") = std::vector<float>{}, py::arg("stop") = std::vector<std::string>{},
           py::arg("abstain_above") = 0.0, py::arg("stop_loops") = false)
        .def("next", [](dola::batch_engine & self, int64_t id, int32_t timeout_ms) -> py::object {
            dola::batch_event ev;
            bool got;
            {
                py::gil_scoped_release release;  // waits for the engine's thread
                got = self.next(id, ev, timeout_ms);
            }
            if (!got) return py::none();
            if (ev.kind == dola::batch_event::step) return py::make_tuple("step", py::cast(std::move(ev.result)));
            if (ev.kind == dola::batch_event::end) return py::make_tuple("end", py::none());
            return py::make_tuple("failed", lenient_str(ev.error));
        }, py::arg("id"), py::arg("timeout_ms") = 100,
           "The request's next event: ('step', Step), ('end', None) or ('failed', reason); None after timeout_ms")
        .def("release", &dola::batch_engine::release, py::arg("id"), py::call_guard<py::gil_scoped_release>())
        .def("stats", [](dola::batch_engine & self) {
            const dola::batch_stats s = self.stats();
            py::dict d;
            d["n_running"] = s.n_running;
            d["n_queued"] = s.n_queued;
            d["n_decodes"] = s.n_decodes;
            d["n_decoded_tokens"] = s.n_decoded_tokens;
            d["n_steps"] = s.n_steps;
            d["n_projections"] = s.n_projections;
            d["n_fused"] = s.n_fused;
            d["n_device_contrasts"] = s.n_device_contrasts;
            d["n_cache_hits"] = s.n_cache_hits;
            d["n_cache_tokens"] = s.n_cache_tokens;
            d["cache_bytes"] = s.cache_bytes;
            d["cache_entries"] = s.cache_entries;
            d["decode_ms"] = s.decode_ms;
            d["step_ms"] = s.step_ms;
            return d;
        });
}
