// The compiled half of the Python module `loco` (python/loco/__init__.py is the other half): a few
// loco configurations compiled once, bound with pybind11, over parameters that arrive as DLPack
// capsules (zero copy), and a communicator that calls back into Python (torch.distributed).
//
// Kept small on purpose: every configuration is one instantiation of loco::diloco, and each one
// costs compile time in CI. A new configuration is one line in PYBIND11_MODULE below plus its
// name in python/loco/__init__.py. See docs/pytorch.md.

#include <loco/dlpack.hpp>
#include <loco/loco.hpp>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// ---- DLPack capsules ----------------------------------------------------------------------------

// The DLTensor inside a capsule from torch.utils.dlpack.to_dlpack (or any __dlpack__), read
// without consuming it: the caller keeps the capsule alive, and with it the tensor's storage.
const DLTensor& tensor_in(const py::handle& capsule, const std::string& what) {
    PyObject* o = capsule.ptr();
    if (!PyCapsule_IsValid(o, "dltensor")) {
        throw loco::invalid_argument("loco: " + what +
                                     " is not an unused DLPack capsule; pass "
                                     "torch.utils.dlpack.to_dlpack(tensor)");
    }
    const auto* m = static_cast<const DLManagedTensor*>(PyCapsule_GetPointer(o, "dltensor"));
    return m->dl_tensor;
}

// Frees a capsule's DLManagedTensor unless a consumer took it (and renamed it "used_dltensor").
void release_capsule(PyObject* o) {
    if (PyCapsule_IsValid(o, "dltensor")) {
        auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(o, "dltensor"));
        if (m != nullptr && m->deleter != nullptr) m->deleter(m);
    }
}

template <class T>
py::object capsule_of(loco::tensor_view<T> v) {
    DLManagedTensor* m = loco::dlpack::export_view(v);
    PyObject* c = PyCapsule_New(m, "dltensor", release_capsule);
    if (c == nullptr) {
        m->deleter(m);
        throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(c);
}

// ---- the communicator over Python (torch.distributed) -------------------------------------------

// Calls the methods of a Python object (python/loco/__init__.py: _TorchDistributed) with DLPack
// capsules over loco's own buffers. Blocking collectives; bytes are counted as the threads
// communicator counts them (the bytes a reduce-scatter + all-gather ring sends), so that
// bytes_sent() agrees with what loco::diloco reports per sync.
class python_communicator final : public loco::comm::communicator {
public:
    python_communicator(py::object backend, int rank, int size, std::string name)
        : backend_(std::move(backend)), rank_(rank), size_(size), name_(std::move(name)) {
        if (size < 1 || rank < 0 || rank >= size) {
            throw loco::invalid_argument("loco: a communicator of size " + std::to_string(size) +
                                         " has no rank " + std::to_string(rank));
        }
    }

    int rank() const noexcept override { return rank_; }
    int size() const noexcept override { return size_; }
    loco::memory_space space() const noexcept override { return loco::memory_space::host; }
    std::string_view name() const noexcept override { return name_; }
    std::uint64_t bytes_sent() const noexcept override { return sent_; }

protected:
    void do_all_reduce(loco::tensor_view<float> data, loco::comm::reduce_op op) override {
        if (size_ > 1 && data.size != 0) {
            call("all_reduce", [&] {
                return std::make_tuple(capsule_of(data), op == loco::comm::reduce_op::mean);
            });
        }
        const auto m = static_cast<std::uint64_t>(size_);
        const auto r = static_cast<std::uint64_t>(rank_);
        const std::uint64_t n = data.size;
        const std::uint64_t mine = n * (r + 1) / m - n * r / m;
        sent_ += 4 * ((m - 1) * mine + (n - mine));
    }
    void do_all_gather(loco::tensor_view<const std::byte> send,
                       loco::tensor_view<std::byte> recv) override {
        if (send.size != 0) {
            call("all_gather", [&] { return std::make_tuple(capsule_of(send), capsule_of(recv)); });
        }
        sent_ += static_cast<std::uint64_t>(size_ - 1) * send.size;
    }
    void do_all_to_all(loco::tensor_view<const std::byte> send,
                       loco::tensor_view<std::byte> recv) override {
        if (send.size != 0) {
            call("all_to_all", [&] { return std::make_tuple(capsule_of(send), capsule_of(recv)); });
        }
        sent_ += static_cast<std::uint64_t>(size_ - 1) * (send.size / static_cast<std::size_t>(size_));
    }
    void do_broadcast(loco::tensor_view<std::byte> data, int root) override {
        if (size_ > 1 && data.size != 0) {
            call("broadcast", [&] { return std::make_tuple(capsule_of(data), root); });
        }
        if (rank_ == root) sent_ += static_cast<std::uint64_t>(size_ - 1) * data.size;
    }
    void do_barrier() override {
        call("barrier", [] { return std::make_tuple(); });
    }

private:
    // Runs backend.<method>(*args()) under the GIL; a Python error becomes loco::comm_error.
    template <class Args>
    void call(const char* method, Args&& args) {
        py::gil_scoped_acquire gil;
        try {
            py::object fn = backend_.attr(method);
            std::apply([&](auto&&... a) { fn(a...); }, args());
        } catch (py::error_already_set& e) {
            const std::string what = e.what();
            throw loco::comm_error(prefix(method) + "torch.distributed failed (" + what + ")");
        }
    }

    py::object backend_;
    int rank_;
    int size_;
    std::string name_;
    std::uint64_t sent_ = 0;
};

// ---- parameters ---------------------------------------------------------------------------------

loco::role role_named(const std::string& s, const std::string& name) {
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

bound_params read_params(const py::list& items) {
    bound_params b;
    for (const py::handle item : items) {
        const auto t = item.cast<py::tuple>();
        const auto name = t[0].cast<std::string>();
        const DLTensor& value = tensor_in(t[1], "the value of '" + name + "'");
        const DLTensor& grad = tensor_in(t[2], "the gradient of '" + name + "'");
        loco::parameter_options o;
        o.role = role_named(t[3].cast<std::string>(), name);
        loco::dlpack::add(b.list, name, value, grad, o);
        b.keep.push_back(py::reinterpret_borrow<py::object>(t[1]));
        b.keep.push_back(py::reinterpret_borrow<py::object>(t[2]));
    }
    return b;
}

// ---- hyper-parameters from Python dicts ---------------------------------------------------------

// Reads the keys of a dict into fields; a key no field takes is refused by name.
class fields {
public:
    fields(const py::dict& d, std::string who) : d_(d), who_(std::move(who)) {}
    template <class T>
    fields& operator()(const char* key, T& field) {
        if (d_.contains(key)) {
            field = d_[key].cast<T>();
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
    const py::dict& d_;
    std::string who_;
    std::vector<std::string> taken_;
};

py::dict sub(const py::dict& d, const char* key) {
    return d.contains(key) ? d[key].cast<py::dict>() : py::dict();
}

void read(const py::dict& d, loco::inner::adamw::hyper& h) {
    fields(d, "AdamW")("lr", h.lr)("beta1", h.beta1)("beta2", h.beta2)("eps", h.eps)(
        "weight_decay", h.weight_decay)
        .done();
}
void read(const py::dict& d, loco::inner::sgd::hyper& h) {
    fields(d, "SGD")("lr", h.lr)("momentum", h.momentum)("dampening", h.dampening)(
        "weight_decay", h.weight_decay)("nesterov", h.nesterov)
        .done();
}
void read(const py::dict& d, loco::inner::muon::hyper& h) {
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
void read(const py::dict& d, loco::outer::nesterov::hyper& h) {
    fields(d, "outer Nesterov")("lr", h.lr)("momentum", h.momentum).done();
}
void read(const py::dict& d, loco::outer::adam::hyper& h) {
    fields(d, "outer Adam")("lr", h.lr)("beta1", h.beta1)("beta2", h.beta2)("tau", h.tau)(
        "bias_correction", h.bias_correction)
        .done();
}
void read(const py::dict& d, loco::schedule::every::hyper& h) {
    fields(d, "schedule Every")("every", h.every).done();
}
void read(const py::dict& d, loco::schedule::streaming::hyper& h) {
    fields(d, "schedule Streaming")("every", h.every)("fragments", h.fragments)(
        "overlap", h.overlap)("alpha", h.alpha)
        .done();
}
void read(const py::dict& d, loco::compress::none::hyper&) { fields(d, "no compression").done(); }
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
    if constexpr (std::is_same_v<Compressor, loco::compress::none>) {
        read(d, h);
    } else {
        read_error_feedback<typename Compressor::base>(d, h);
    }
}

// ---- the handles --------------------------------------------------------------------------------

std::string save_bytes(const auto& h) {
    std::ostringstream os;
    h.save(os);
    return os.str();
}
void load_bytes(auto& h, const py::bytes& b) {
    std::istringstream is(std::string(b), std::ios::binary);
    h.load(is);
}

template <class Handle>
class bound_diloco {
public:
    bound_diloco(const py::list& items, loco::comm::communicator& comm, const py::dict& hyper)
        : params_(read_params(items)) {
        typename Handle::config cfg;
        read(sub(hyper, "inner"), cfg.inner);
        read(sub(hyper, "outer"), cfg.outer);
        read(sub(hyper, "schedule"), cfg.schedule);
        read_compress<typename Handle::compressor_policy>(sub(hyper, "compress"), cfg.compress);
        std::string on_nonfinite = "skip";
        fields(sub(hyper, "options"), "loco.DiLoCo")("seed", cfg.seed)("workers", cfg.workers)(
            "broadcast_initial", cfg.broadcast_initial)("on_nonfinite", on_nonfinite)(
            "max_skipped_syncs", cfg.max_skipped_syncs)
            .done();
        cfg.on_nonfinite = nonfinite(on_nonfinite);
        handle_ = std::make_unique<Handle>(params_.list, comm, cfg);
    }

    static void bind(py::module_& m, const char* name) {
        using B = bound_diloco;
        py::class_<B>(m, name)
            .def(py::init<const py::list&, loco::comm::communicator&, const py::dict&>(),
                 py::keep_alive<1, 3>())
            .def("start", [](B& b) {
                py::gil_scoped_release nogil;
                return b.handle_->start();
            })
            .def("step", [](B& b) {
                py::gil_scoped_release nogil;
                const loco::step_result r = b.handle_->step();
                return std::make_pair(r.applied, r.synced);
            })
            .def("sync", [](B& b) {
                py::gil_scoped_release nogil;
                b.handle_->sync();
            })
            .def("save", [](const B& b) { return py::bytes(save_bytes(*b.handle_)); })
            .def("load", [](B& b, const py::bytes& s) { load_bytes(*b.handle_, s); })
            .def("set_inner_lr", [](B& b, float lr) { set_lr(b.handle_->inner_hyper(), lr); })
            .def("set_outer_lr", [](B& b, float lr) { b.handle_->outer_hyper().lr = lr; })
            .def_property_readonly("calls", [](const B& b) { return b.handle_->calls(); })
            .def_property_readonly("inner_steps", [](const B& b) { return b.handle_->inner_steps(); })
            .def_property_readonly("outer_steps", [](const B& b) { return b.handle_->outer_steps(); })
            .def_property_readonly("skipped_steps",
                                   [](const B& b) { return b.handle_->skipped_steps(); })
            .def_property_readonly("skipped_syncs",
                                   [](const B& b) { return b.handle_->skipped_syncs(); })
            .def_property_readonly("fragments", [](const B& b) { return b.handle_->fragments(); })
            .def_property_readonly("bytes_per_sync",
                                   [](const B& b) { return b.handle_->bytes_per_sync(); })
            .def_property_readonly("fingerprint_bytes",
                                   [](const B& b) { return b.handle_->fingerprint_bytes(); })
            .def_property_readonly("fingerprint", [](const B& b) { return b.handle_->fingerprint(); })
            .def("global_params", [](const B& b) {
                const auto g = b.handle_->global();
                return std::vector<float>(g.begin(), g.end());
            })
            .def("compressor_state", [](const B& b) {
                const auto s = b.handle_->compressor_state();
                return std::vector<float>(s.begin(), s.end());
            });
    }

private:
    static loco::nonfinite_policy nonfinite(const std::string& s) {
        if (s == "skip") return loco::nonfinite_policy::skip;
        if (s == "raise") return loco::nonfinite_policy::raise;
        if (s == "ignore") return loco::nonfinite_policy::ignore;
        throw loco::invalid_argument("loco: on_nonfinite must be 'skip', 'raise' or 'ignore'");
    }
    template <class H>
    static void set_lr(H& h, float lr) {
        if constexpr (requires { h.lr; }) {
            h.lr = lr;
        } else {
            std::apply([&](auto&... g) { ((g.lr = lr), ...); }, h);
        }
    }

    bound_params params_;
    std::unique_ptr<Handle> handle_;
};

// A bare inner optimizer (no sync), for trainers without DiLoCo and for the parity tests.
template <class Inner>
class bound_optimizer {
public:
    bound_optimizer(const py::list& items, const py::dict& hyper) : params_(read_params(items)) {
        typename loco::optimizer<Inner>::config cfg;
        read(hyper, cfg.inner);
        opt_ = std::make_unique<loco::optimizer<Inner>>(params_.list, cfg);
    }
    static void bind(py::module_& m, const char* name) {
        using B = bound_optimizer;
        py::class_<B>(m, name)
            .def(py::init<const py::list&, const py::dict&>())
            .def("step", [](B& b) {
                py::gil_scoped_release nogil;
                return b.opt_->step().applied;
            })
            .def("save", [](const B& b) { return py::bytes(save_bytes(*b.opt_)); })
            .def("load", [](B& b, const py::bytes& s) { load_bytes(*b.opt_, s); })
            .def_property_readonly("steps", [](const B& b) { return b.opt_->steps(); });
    }

private:
    bound_params params_;
    std::unique_ptr<loco::optimizer<Inner>> opt_;
};

// MuLoCo's 2-bit statistical quantizer on one tensor: encode + decode, for the parity test and
// for users who want to see what the wire carries. Returns the payload size in bytes.
std::size_t two_bit_round_trip(const py::handle& in, const py::handle& out, std::size_t rows,
                               bool per_row, float range) {
    using Q = loco::compress::statistical<2>;
    const auto x = loco::dlpack::view<const float>(tensor_in(in, "the input"), "the input");
    const auto y = loco::dlpack::view<float>(tensor_in(out, "the output"), "the output");
    if (x.space != loco::memory_space::host || y.space != loco::memory_space::host ||
        x.size != y.size) {
        throw loco::invalid_argument("loco: two_bit_round_trip needs two CPU tensors of one size");
    }
    Q::hyper h;
    h.per = per_row ? loco::compress::granularity::row : loco::compress::granularity::tensor;
    h.range = range;
    Q::validate(h);
    const loco::compress::segment seg{0, x.size, rows, rows == 0 ? 0 : x.size / rows};
    std::vector<std::byte> payload(Q::payload_bytes(h, {&seg, 1}));
    Q::encode(h, {x.data, x.size}, {&seg, 1}, {}, {}, payload);
    Q::decode(h, payload, {&seg, 1}, {y.data, y.size});
    return payload.size();
}

}  // namespace

PYBIND11_MODULE(_loco, m) {
    m.doc() = "loco's compiled configurations (use the package `loco`, python/loco/__init__.py)";

    auto& base = py::register_exception<loco::error>(m, "Error", PyExc_RuntimeError);
    py::register_exception<loco::invalid_argument>(m, "InvalidArgument", base.ptr());
    py::register_exception<loco::shape_error>(m, "ShapeError", base.ptr());
    py::register_exception<loco::memory_space_error>(m, "MemorySpaceError", base.ptr());
    py::register_exception<loco::nonfinite_error>(m, "NonfiniteError", base.ptr());
    py::register_exception<loco::comm_error>(m, "CommError", base.ptr());
    py::register_exception<loco::wire_error>(m, "WireError", base.ptr());
    py::register_exception<loco::checkpoint_error>(m, "CheckpointError", base.ptr());

    py::class_<loco::comm::communicator>(m, "Communicator")
        .def_property_readonly("rank", &loco::comm::communicator::rank)
        .def_property_readonly("size", &loco::comm::communicator::size)
        .def_property_readonly("name",
                               [](const loco::comm::communicator& c) { return std::string(c.name()); })
        .def_property_readonly("bytes_sent", &loco::comm::communicator::bytes_sent);
    py::class_<loco::comm::single, loco::comm::communicator>(m, "Single").def(py::init<>());
    py::class_<python_communicator, loco::comm::communicator>(m, "PythonCommunicator")
        .def(py::init<py::object, int, int, std::string>());

    using every = loco::schedule::every;
    using muloco_inner = loco::groups<loco::group<loco::is_hidden_matrix, loco::inner::muon>,
                                      loco::group<loco::otherwise, loco::inner::adamw>>;
    bound_diloco<loco::diloco<loco::inner::adamw, loco::outer::nesterov>>::bind(m, "DiLoCo_adamw_nesterov");
    bound_diloco<loco::diloco<loco::inner::adamw, loco::outer::nesterov, loco::compress::none,
                              loco::schedule::streaming>>::bind(m, "DiLoCo_adamw_nesterov_streaming");
    bound_diloco<loco::diloco<muloco_inner, loco::outer::nesterov,
                              loco::compress::error_feedback<loco::compress::statistical<2>>,
                              every>>::bind(m, "DiLoCo_muloco_nesterov_twobit");
    bound_diloco<loco::diloco<loco::inner::sgd, loco::outer::adam>>::bind(m, "DiLoCo_sgd_adam");
    bound_optimizer<loco::inner::adamw>::bind(m, "Optimizer_adamw");
    bound_optimizer<loco::inner::sgd>::bind(m, "Optimizer_sgd");
    m.def("two_bit_round_trip", &two_bit_round_trip, py::arg("x"), py::arg("out"),
          py::arg("rows") = 0, py::arg("per_row") = false, py::arg("range") = 6.0f);
}
