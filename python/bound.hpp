#pragma once
// The binding rules of the Python module, shared by its two translation units: python/_loco.cpp
// (g++: the host configurations, the communicator, the module itself) and python/_loco_cuda.cu
// (nvcc: the same configurations on loco::cuda::diloco and loco::cuda::optimizer, built when CUDA
// is enabled). One copy of each rule: a handle type in, a pybind11 class out. Everything here is
// a template or inline, in a named namespace, so the two units share one definition (hidden, as
// pybind11's own types are, whose objects it holds).

#include <loco/dlpack.hpp>
#include <loco/loco.hpp>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace loco_python __attribute__((visibility("hidden"))) {

namespace py = pybind11;

// Binds the CUDA configurations (python/_loco_cuda.cu); defined only when the module is built
// with CUDA (LOCO_PYTHON_CUDA).
void bind_cuda(py::module_& m);

// ---- DLPack capsules ----------------------------------------------------------------------------

// The DLTensor inside a capsule from torch.utils.dlpack.to_dlpack (or any __dlpack__), read
// without consuming it: the caller keeps the capsule alive, and with it the tensor's storage.
inline const DLTensor& tensor_in(const py::handle& capsule, const std::string& what) {
    PyObject* o = capsule.ptr();
    if (!PyCapsule_IsValid(o, "dltensor")) {
        throw loco::invalid_argument("loco: " + what +
                                     " is not an unused DLPack capsule; pass "
                                     "torch.utils.dlpack.to_dlpack(tensor)");
    }
    const auto* m = static_cast<const DLManagedTensor*>(PyCapsule_GetPointer(o, "dltensor"));
    return m->dl_tensor;
}

// ---- interrupts in the communicator's callbacks -------------------------------------------------

// What a communicator that calls back into Python (python/_loco.cpp, python_communicator) keeps of
// a callback interrupted by a BaseException that is not an Exception (KeyboardInterrupt,
// SystemExit): loco's C++ side sees the callback fail as loco::comm_error and handles the failure
// as any other, and the handle's call then raises the interrupt itself (bound_diloco::collective)
// instead of loco.CommError, so that the caller's `except KeyboardInterrupt:` runs. Under the GIL.
class python_interrupts {
public:
    // Keeps the first interrupt until a handle's call raises it.
    void keep_interrupt(const py::error_already_set& e) {
        if (!pending_) pending_ = e;
    }
    // Raises the kept interrupt, if any, as the Python exception it was (its traceback too).
    void raise_interrupt() {
        if (pending_) {
            const py::error_already_set e = *pending_;
            pending_.reset();
            throw e;
        }
    }

protected:
    ~python_interrupts() = default;

private:
    std::optional<py::error_already_set> pending_;
};

// ---- parameters ---------------------------------------------------------------------------------

inline loco::role role_named(const std::string& s, const std::string& name) {
    if (s.empty() || s == "unspecified") return loco::role::unspecified;
    if (s == "matrix") return loco::role::matrix;
    if (s == "vector") return loco::role::vector;
    if (s == "embedding") return loco::role::embedding;
    if (s == "head") return loco::role::head;
    throw loco::invalid_argument("loco: parameter '" + name + "' has role '" + s +
                                 "'; use matrix, vector, embedding or head");
}

// The parameter list of (name, value capsule, grad capsule, role) tuples; the capsules stay with
// the handle, which keeps the tensors' storage alive.
struct bound_params {
    loco::parameter_list list;
    std::vector<py::object> keep;
};

inline bound_params read_params(const py::list& items) {
    bound_params b;
    for (const py::handle item : items) {
        const auto t = item.cast<py::tuple>();
        const auto name = t[0].cast<std::string>();
        const DLTensor& value = tensor_in(t[1], "the value of '" + name + "'");
        const DLTensor& grad = tensor_in(t[2], "the gradient of '" + name + "'");
        if (!py::isinstance<py::str>(t[3])) {
            throw loco::invalid_argument("loco: the role of parameter '" + name +
                                         "' must be a string, got " + std::string(py::repr(t[3])));
        }
        loco::parameter_options o;
        o.role = role_named(t[3].cast<std::string>(), name);
        loco::dlpack::add(b.list, name, value, grad, o);
        b.keep.push_back(py::reinterpret_borrow<py::object>(t[1]));
        b.keep.push_back(py::reinterpret_borrow<py::object>(t[2]));
    }
    return b;
}

// ---- hyper-parameters from Python dicts ---------------------------------------------------------

// Reads the keys of a dict into fields; a key no field takes, or a value its field cannot hold
// (pybind11's cast fails: a negative count, a float for an integer), is refused by name.
class fields {
public:
    fields(const py::dict& d, std::string who) : d_(d), who_(std::move(who)) {}
    template <class T>
    fields& operator()(const char* key, T& field) {
        if (d_.contains(key)) {
            try {
                field = d_[key].cast<T>();
            } catch (const py::cast_error&) {
                throw loco::invalid_argument("loco: " + who_ + " hyper-parameter '" + key +
                                             "' must be " + kind<T>() + ", got " +
                                             std::string(py::repr(d_[key])));
            }
            taken_.emplace_back(key);
        }
        return *this;
    }
    void done() const {
        for (const auto& kv : d_) {
            const auto key = kv.first.cast<std::string>();
            bool known = false;
            for (const auto& t : taken_) known = known || t == key;
            if (!known) {
                throw loco::invalid_argument("loco: " + who_ + " has no hyper-parameter '" + key +
                                             "'");
            }
        }
    }

private:
    template <class T>
    static std::string kind() {
        if constexpr (std::is_same_v<T, bool>) {
            return "True or False";
        } else if constexpr (std::is_integral_v<T>) {
            return "an integer in [" + std::to_string(std::numeric_limits<T>::min()) + ", " +
                   std::to_string(std::numeric_limits<T>::max()) + "]";
        } else if constexpr (std::is_floating_point_v<T>) {
            return "a number";
        } else if constexpr (std::is_same_v<T, std::string>) {
            return "a string";
        } else {
            return "a dict";
        }
    }

    const py::dict& d_;
    std::string who_;
    std::vector<std::string> taken_;
};

inline py::dict sub(const py::dict& d, const char* key) {
    return d.contains(key) ? d[key].cast<py::dict>() : py::dict();
}

inline void read(const py::dict& d, loco::inner::adamw::hyper& h) {
    fields(d, "AdamW")("lr", h.lr)("beta1", h.beta1)("beta2", h.beta2)("eps", h.eps)(
        "weight_decay", h.weight_decay)
        .done();
}
inline void read(const py::dict& d, loco::inner::sgd::hyper& h) {
    fields(d, "SGD")("lr", h.lr)("momentum", h.momentum)("dampening", h.dampening)(
        "weight_decay", h.weight_decay)("nesterov", h.nesterov)
        .done();
}
inline void read(const py::dict& d, loco::inner::muon::hyper& h) {
    std::string coefficients = "keller_jordan", adjust = "original";
    fields(d, "Muon")("lr", h.lr)("weight_decay", h.weight_decay)("momentum", h.momentum)(
        "nesterov", h.nesterov)("eps", h.eps)("ns_steps", h.ns_steps)("coefficients",
                                                                     coefficients)(
        "adjust_lr", adjust)
        .done();
    if (coefficients == "muloco") {
        h.coefficients = loco::linalg::ns_coefficients::muloco();
    } else if (coefficients != "keller_jordan") {
        throw loco::invalid_argument("loco: Muon coefficients must be 'keller_jordan' or 'muloco'");
    }
    if (adjust == "spectral_norm") {
        h.adjust_lr = loco::inner::lr_adjustment::spectral_norm;
    } else if (adjust == "match_rms_adamw") {
        h.adjust_lr = loco::inner::lr_adjustment::match_rms_adamw;
    } else if (adjust != "original") {
        throw loco::invalid_argument(
            "loco: Muon adjust_lr must be 'original', 'spectral_norm' or 'match_rms_adamw'");
    }
}
template <class... G>
void read(const py::dict& d, std::tuple<G...>& h) {
    // Parameter groups: the dict holds one dict per group, keys "0", "1", ...
    fields f(d, "the parameter groups");
    std::vector<py::dict> parts(sizeof...(G));
    for (std::size_t i = 0; i < parts.size(); ++i) f(std::to_string(i).c_str(), parts[i]);
    f.done();
    std::size_t i = 0;
    std::apply([&](auto&... g) { (read(parts[i++], g), ...); }, h);
}
inline void read(const py::dict& d, loco::outer::nesterov::hyper& h) {
    fields(d, "outer Nesterov")("lr", h.lr)("momentum", h.momentum).done();
}
inline void read(const py::dict& d, loco::outer::adam::hyper& h) {
    fields(d, "outer Adam")("lr", h.lr)("beta1", h.beta1)("beta2", h.beta2)("tau", h.tau)(
        "bias_correction", h.bias_correction)
        .done();
}
inline void read(const py::dict& d, loco::outer::sgd::hyper& h) {
    fields(d, "outer SGD")("lr", h.lr).done();
}
inline void read(const py::dict& d, loco::outer::sign_sgd::hyper& h) {
    fields(d, "outer SignSGD")("lr", h.lr)("weight_decay", h.weight_decay).done();
}
inline void read(const py::dict& d, loco::schedule::every::hyper& h) {
    fields(d, "schedule Every")("every", h.every).done();
}
inline void read(const py::dict& d, loco::schedule::streaming::hyper& h) {
    fields(d, "schedule Streaming")("every", h.every)("fragments", h.fragments)(
        "overlap", h.overlap)("alpha", h.alpha)
        .done();
}
inline void read(const py::dict& d, loco::compress::none::hyper&) { fields(d, "no compression").done(); }
inline loco::compress::index_coding index_coding_named(const std::string& s, const char* who) {
    if (s == "compact") return loco::compress::index_coding::compact;
    if (s == "fixed") return loco::compress::index_coding::fixed;
    throw loco::invalid_argument(std::string("loco: ") + who + " indices must be 'compact' or 'fixed'");
}
inline void read(const py::dict& d, loco::compress::sparseloco::hyper& h) {
    std::string indices = "compact";
    fields(d, "SparseLoCo")("chunk", h.chunk)("topk", h.topk)("bins", h.bins)("range", h.range)(
        "beta", h.beta)("indices", indices)
        .done();
    h.indices = index_coding_named(indices, "SparseLoCo");
}
inline void read(const py::dict& d, loco::compress::demo::hyper& h) {
    std::string indices = "compact";
    fields(d, "DeMo")("chunk", h.chunk)("topk", h.topk)("decay", h.decay)("sign", h.sign)(
        "indices", indices)
        .done();
    h.indices = index_coding_named(indices, "DeMo");
}
// The aggregation goes with the compressor (python/loco/__init__.py puts its keys under
// "aggregate"): the mean for the dense ones, each reference's own for SparseLoCo and DeMo.
inline void read(const py::dict& d, loco::aggregate::mean::hyper&) {
    fields(d, "the mean").done();
}
inline void read(const py::dict& d, loco::aggregate::median_norm_clip::hyper& h) {
    fields(d, "SparseLoCo's aggregation")("clip", h.clip)("epsilon", h.epsilon).done();
}
inline void read(const py::dict& d, loco::aggregate::scatter_mean::hyper&) {
    fields(d, "DeMo's aggregation").done();
}
template <class C>
void read_error_feedback(const py::dict& d, typename loco::compress::error_feedback<C>::hyper& h) {
    std::string per = "tensor";
    fields(d, "TwoBit")("decay", h.decay)("fold_outer_lr", h.fold_outer_lr)("per", per)(
        "range", h.compress.range)
        .done();
    if (per == "row") {
        h.compress.per = loco::compress::granularity::row;
    } else if (per != "tensor") {
        throw loco::invalid_argument("loco: TwoBit per must be 'tensor' or 'row'");
    }
}

template <class Compressor, class H>
void read_compress(const py::dict& d, H& h) {
    if constexpr (requires { typename Compressor::base; }) {  // error_feedback<...>
        read_error_feedback<typename Compressor::base>(d, h);
    } else {
        read(d, h);
    }
}

// ---- the handles --------------------------------------------------------------------------------

std::string save_bytes(const auto& h) {
    std::ostringstream os;
    h.save(os);
    return os.str();
}
void load_bytes(auto& h, const std::string& b) {
    std::istringstream is(b, std::ios::binary);
    h.load(is);
}

// The stream a CUDA configuration launches on: torch's cudaStream_t as an integer
// (torch.cuda.Stream.cuda_stream; 0 is the legacy default stream). The host configurations have
// none and take only 0.
template <class Config>
void set_stream(Config& cfg, std::uintptr_t stream) {
    if constexpr (requires { cfg.stream = reinterpret_cast<decltype(cfg.stream)>(stream); }) {
        cfg.stream = reinterpret_cast<decltype(cfg.stream)>(stream);
    } else if (stream != 0) {
        throw loco::invalid_argument(
            "loco: a CUDA stream was given for parameters on the CPU; leave stream unset");
    }
}

// Every call on a handle holds the handle's mutex, so that two Python threads calling step() (or
// anything else) on one optimizer take turns instead of corrupting it. The mutex is taken with the
// GIL released, never while holding it: a step() that syncs through torch.distributed reacquires
// the GIL inside the lock (python/_loco.cpp, python_communicator::call), and a thread that held
// the GIL while waiting for the mutex would deadlock against it. The handle's own calls never
// re-enter it from the communicator's callbacks, the only Python code run under the lock.
class locked {
public:
    explicit locked(std::mutex& m) : lock_(m) {}

private:
    py::gil_scoped_release nogil_;  // released first, reacquired after the unlock
    std::lock_guard<std::mutex> lock_;
};

// set_lr's check before anything changes: the learning rate goes into a copy of the
// hyper-parameters, which the policy validates (the constructor's rules); the caller replaces
// them only when every copy passed, so a refused rate (NaN, negative) leaves the handle as it was.
template <class Policy, class H>
H checked_lr(const H& h, float lr) {
    H next = h;
    if constexpr (requires { typename Policy::hyper; }) {
        next.lr = lr;
        loco::detail::validate_hyper<Policy>(next);
    } else {  // loco::groups<...>: every group gets lr, and every group's rules apply
        std::apply([&](auto&... g) { ((g.lr = lr), ...); }, next);
        loco::detail::inner_engine<Policy>::validate(next);
    }
    return next;
}

// One loco::diloco (host or CUDA backend) over the parameters of a Python list.
template <class Handle>
class bound_diloco {
public:
    bound_diloco(const py::list& items, py::object comm_object, const py::dict& hyper,
                 std::uintptr_t stream)
        : params_(read_params(items)), comm_(std::move(comm_object)) {
        auto& comm = comm_.cast<loco::comm::communicator&>();
        typename Handle::config cfg;
        read(sub(hyper, "inner"), cfg.inner);
        read(sub(hyper, "outer"), cfg.outer);
        read(sub(hyper, "schedule"), cfg.schedule);
        read_compress<typename Handle::compressor_policy>(sub(hyper, "compress"), cfg.compress);
        read(sub(hyper, "aggregate"), cfg.aggregate);
        std::string on_nonfinite = "skip";
        fields(sub(hyper, "options"), "loco.DiLoCo")("seed", cfg.seed)("workers", cfg.workers)(
            "broadcast_initial", cfg.broadcast_initial)("on_nonfinite", on_nonfinite)(
            "max_skipped_syncs", cfg.max_skipped_syncs)
            .done();
        cfg.on_nonfinite = nonfinite(on_nonfinite);
        set_stream(cfg, stream);
        // Every Python object was read above; building the handle (allocating and copying the
        // global snapshot, the outer and inner state: seconds for a large model) runs without the
        // GIL, as step() does. It does not communicate (docs/diloco.md), and a communicator that
        // called back into Python would reacquire the GIL itself (python_communicator::call).
        const py::gil_scoped_release nogil;
        handle_ = std::make_unique<Handle>(params_.list, comm, cfg);
        interrupts_ = dynamic_cast<python_interrupts*>(&comm);  // comm_ keeps comm alive
    }

    static void bind(py::module_& m, const char* name) {
        using B = bound_diloco;
        py::class_<B>(m, name)
            .def(py::init<const py::list&, py::object, const py::dict&, std::uintptr_t>(),
                 py::arg("items"), py::arg("comm"), py::arg("hyper"), py::arg("stream") = 0)
            .def("start", [](B& b) { return b.collective([](Handle& h) { return h.start(); }); })
            .def("step", [](B& b) {
                const loco::step_result r = b.collective([](Handle& h) { return h.step(); });
                return std::make_tuple(r.applied, r.synced, r.received_initial);
            })
            .def("sync", [](B& b) { b.collective([](Handle& h) { h.sync(); }); })
            .def("flush", [](B& b) { b.collective([](Handle& h) { h.flush(); }); })
            .def("regroup", &B::regroup, py::arg("comm"), py::arg("donor") = 0)
            .def("save", [](B& b) {
                return py::bytes(b.call([](const Handle& h) { return save_bytes(h); }));
            })
            .def("load", [](B& b, const py::bytes& s) {
                std::string bytes(s);  // read under the GIL
                const locked l(b.mutex_);
                load_bytes(*b.handle_, bytes);
            })
            // Both rates are checked before either changes: set_lr(inner=..., outer=bad) used to
            // raise with the inner rate already in place.
            .def(
                "set_lr",
                [](B& b, std::optional<float> inner, std::optional<float> outer) {
                    const locked l(b.mutex_);
                    auto& in = b.handle_->inner_hyper();
                    auto& out = b.handle_->outer_hyper();
                    auto next_in = in;
                    auto next_out = out;
                    if (inner) next_in = checked_lr<typename Handle::inner_policy>(in, *inner);
                    if (outer) next_out = checked_lr<typename Handle::outer_policy>(out, *outer);
                    in = next_in;
                    out = next_out;
                },
                py::arg("inner") = py::none(), py::arg("outer") = py::none())
            .def_property_readonly("calls", getter([](const Handle& h) { return h.calls(); }))
            .def_property_readonly("inner_steps",
                                   getter([](const Handle& h) { return h.inner_steps(); }))
            .def_property_readonly("outer_steps",
                                   getter([](const Handle& h) { return h.outer_steps(); }))
            .def_property_readonly("skipped_steps",
                                   getter([](const Handle& h) { return h.skipped_steps(); }))
            .def_property_readonly("skipped_syncs",
                                   getter([](const Handle& h) { return h.skipped_syncs(); }))
            .def_property_readonly("fragments",
                                   getter([](const Handle& h) { return h.fragments(); }))
            .def_property_readonly("bytes_per_sync",
                                   getter([](const Handle& h) { return h.bytes_per_sync(); }))
            .def_property_readonly("agreement_bytes_per_sync",
                                   getter([](const Handle& h) {
                                       return h.agreement_bytes_per_sync();
                                   }))
            .def_property_readonly("fingerprint_bytes",
                                   getter([](const Handle& h) { return h.fingerprint_bytes(); }))
            .def_property_readonly("fingerprint",
                                   getter([](const Handle& h) { return h.fingerprint(); }))
            // As bytes for torch.frombuffer: a list of Python floats cost ~11x the memory and
            // seconds per 64 MiB.
            .def("global_params", [](B& b) {
                return float_bytes(b.call([](const Handle& h) {
                    const auto g = h.global();
                    return std::vector<float>(g.begin(), g.end());
                }));
            })
            .def("compressor_state", [](B& b) {
                return float_bytes(b.call([](const Handle& h) {
                    const auto s = h.compressor_state();
                    return std::vector<float>(s.begin(), s.end());
                }));
            });
    }

private:
    // loco::diloco::regroup() onto `group` (collective over it). Its collectives run on the new
    // group, so an interrupt in one of its callbacks is that communicator's to raise. The handle's
    // interrupts become the group's under the lock, with the handle's communicator: a call from
    // another thread queued behind this one runs on the group and raises its interrupts. On
    // success the handle holds the new communicator object and lets go of the old one (its
    // process group can be destroyed); a failed regroup() changes nothing (docs/reliability.md).
    void regroup(py::object group_object, int donor) {
        auto& group = group_object.cast<loco::comm::communicator&>();
        python_interrupts* group_interrupts = dynamic_cast<python_interrupts*>(&group);
        collective(
            [&](Handle& h) {
                h.regroup(group, donor);
                interrupts_ = group_interrupts;
            },
            group_interrupts);
        comm_ = std::move(group_object);
    }

    // A bytearray (writable, so torch.frombuffer shares it without a warning) of the floats.
    static py::bytearray float_bytes(const std::vector<float>& v) {
        return py::bytearray(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
    }

    static loco::nonfinite_policy nonfinite(const std::string& s) {
        if (s == "skip") return loco::nonfinite_policy::skip;
        if (s == "raise") return loco::nonfinite_policy::raise;
        if (s == "ignore") return loco::nonfinite_policy::ignore;
        throw loco::invalid_argument("loco: on_nonfinite must be 'skip', 'raise' or 'ignore'");
    }

    // fn(handle) under the lock, for the calls that may communicate. A KeyboardInterrupt or
    // SystemExit raised in one of the communicator's callbacks meanwhile is raised once the call
    // is over (with the GIL back), in place of what the call threw (loco.CommError) or returned.
    // The communicator is the one the call runs on, read under the lock (regroup() changes it
    // there), or `group` for regroup() itself.
    template <class F>
    auto collective(F fn, std::optional<python_interrupts*> group = std::nullopt) {
        python_interrupts* interrupts = nullptr;
        auto run = [&] {
            const locked l(mutex_);
            interrupts = group ? *group : interrupts_;
            return fn(*handle_);
        };
        const auto raise_kept = [&] {
            if (interrupts != nullptr) interrupts->raise_interrupt();
        };
        try {
            if constexpr (std::is_void_v<decltype(run())>) {
                run();
                raise_kept();
            } else {
                auto r = run();
                raise_kept();
                return r;
            }
        } catch (const py::error_already_set&) {
            throw;
        } catch (...) {
            raise_kept();
            throw;
        }
    }

    // fn(handle) under the lock; its result is converted to Python after the GIL is back.
    template <class F>
    auto call(F fn) {
        const locked l(mutex_);
        return fn(std::as_const(*handle_));
    }
    // A read-only property: the accessor called under the lock.
    template <class F>
    static auto getter(F accessor) {
        return [accessor](bound_diloco& b) { return b.call(accessor); };
    }

    bound_params params_;
    // The Python communicator object the handle uses: held here (not by keep_alive) so that
    // regroup() can let go of the old one. Declared before handle_, so destroyed after it (the
    // handle's destructor may still wait on the communicator).
    py::object comm_;
    std::unique_ptr<Handle> handle_;
    std::mutex mutex_;
    python_interrupts* interrupts_ = nullptr;  // the communicator's, if it calls into Python
};

// A bare inner optimizer (no sync), for trainers without DiLoCo and for the parity tests:
// loco::optimizer<Inner> or loco::cuda::optimizer<Inner>.
template <class Optimizer>
class bound_optimizer {
public:
    bound_optimizer(const py::list& items, const py::dict& hyper, std::uintptr_t stream)
        : params_(read_params(items)) {
        typename Optimizer::config cfg;
        read(hyper, cfg.inner);
        set_stream(cfg, stream);
        const py::gil_scoped_release nogil;  // as bound_diloco's constructor
        opt_ = std::make_unique<Optimizer>(params_.list, cfg);
    }
    static void bind(py::module_& m, const char* name) {
        using B = bound_optimizer;
        py::class_<B>(m, name)
            .def(py::init<const py::list&, const py::dict&, std::uintptr_t>(), py::arg("items"),
                 py::arg("hyper"), py::arg("stream") = 0)
            .def("step", [](B& b) {
                const locked l(b.mutex_);
                return b.opt_->step().applied;
            })
            .def("save", [](B& b) {
                std::string bytes;
                {
                    const locked l(b.mutex_);
                    bytes = save_bytes(*b.opt_);
                }
                return py::bytes(bytes);
            })
            .def("load", [](B& b, const py::bytes& s) {
                std::string bytes(s);  // read under the GIL
                const locked l(b.mutex_);
                load_bytes(*b.opt_, bytes);
            })
            .def_property_readonly("steps", [](B& b) {
                const locked l(b.mutex_);
                return b.opt_->steps();
            });
    }

private:
    bound_params params_;
    std::unique_ptr<Optimizer> opt_;
    std::mutex mutex_;  // as bound_diloco's (locked)
};

// The compiled configurations on one backend (loco::host_backend with loco::optimizer, or
// loco::cuda_backend with loco::cuda::optimizer), each class named `prefix` + its name. A new
// configuration is one line here plus its key in python/loco/__init__.py (_CONFIGS).
template <class Backend, template <class> class Optimizer>
void bind_configurations(py::module_& m, const std::string& prefix) {
    using loco::inner::adamw;
    using loco::inner::sgd;
    using none = loco::compress::none;
    using every = loco::schedule::every;
    using mean = loco::aggregate::mean;
    using muloco_inner = loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::muon>,
                                      loco::group<loco::otherwise, loco::inner::adamw>>;
    using two_bit = loco::compress::error_feedback<loco::compress::statistical<2>>;
    auto named = [&](const char* name) { return prefix + name; };
    bound_diloco<loco::diloco<adamw, loco::outer::nesterov, none, every, mean, Backend>>::bind(
        m, named("DiLoCo_adamw_nesterov").c_str());
    bound_diloco<loco::diloco<adamw, loco::outer::nesterov, none, loco::schedule::streaming, mean,
                              Backend>>::bind(m, named("DiLoCo_adamw_nesterov_streaming").c_str());
    bound_diloco<loco::diloco<muloco_inner, loco::outer::nesterov, two_bit, every, mean,
                              Backend>>::bind(m, named("DiLoCo_muloco_nesterov_twobit").c_str());
    bound_diloco<loco::diloco<sgd, loco::outer::adam, none, every, mean, Backend>>::bind(
        m, named("DiLoCo_sgd_adam").c_str());
    // The frontier's compressors with their references' own aggregation and outer step
    // (docs/compressors.md): SparseLoCo as templar runs it, DeMo with fp32 values or signs.
    using loco::compress::demo;
    using loco::compress::sparseloco;
    bound_diloco<loco::diloco<adamw, loco::outer::sgd, sparseloco, every,
                              loco::aggregate::median_norm_clip, Backend>>::bind(
        m, named("DiLoCo_adamw_sgd_sparseloco").c_str());
    bound_diloco<loco::diloco<adamw, loco::outer::sgd, demo, every, loco::aggregate::scatter_mean,
                              Backend>>::bind(m, named("DiLoCo_adamw_sgd_demo").c_str());
    bound_diloco<loco::diloco<adamw, loco::outer::sign_sgd, demo, every,
                              loco::aggregate::scatter_mean, Backend>>::bind(
        m, named("DiLoCo_adamw_signsgd_demo").c_str());
    bound_optimizer<Optimizer<adamw>>::bind(m, named("Optimizer_adamw").c_str());
    bound_optimizer<Optimizer<sgd>>::bind(m, named("Optimizer_sgd").c_str());
}

}  // namespace loco_python
