// The compiled half of the Python module `loco` (python/loco/__init__.py is the other half): a few
// loco configurations compiled once, bound with pybind11, over parameters that arrive as DLPack
// capsules (zero copy), and a communicator that calls back into Python (torch.distributed).
//
// Kept small on purpose: every configuration is one instantiation of loco::diloco, and each one
// costs compile time in CI. The binding rules and the list of configurations are in
// python/bound.hpp, shared with python/_loco_cuda.cu, which binds the same configurations on the
// CUDA backend when the module is built with CUDA (LOCO_PYTHON_CUDA). See docs/pytorch.md.

#include "bound.hpp"

// The host loops of every configuration here (AdamW's above all) are vectorised only without
// errno handling: python/CMakeLists.txt passes -fno-math-errno, which GCC and Clang announce with
// __NO_MATH_ERRNO__. A build that lost the flag would be about 3x slower per step() without a sign,
// so it stops here (cmake/loco_warnings.cmake, docs/pytorch.md "The cost of a call").
#if (defined(__GNUC__) || defined(__clang__)) && !defined(__NO_MATH_ERRNO__)
#error "loco's Python module must be built with -fno-math-errno (see python/CMakeLists.txt)"
#endif

#include <atomic>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

using loco_python::tensor_in;

// ---- DLPack capsules ----------------------------------------------------------------------------

// Frees a capsule's DLManagedTensor unless a consumer took it (and renamed it "used_dltensor").
void release_capsule(PyObject* o) {
    if (PyCapsule_IsValid(o, "dltensor")) {
        auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(o, "dltensor"));
        if (m != nullptr && m->deleter != nullptr) m->deleter(m);
    }
}

// A capsule over a loco buffer; CUDA memory is marked as on GPU `device`.
template <class T>
py::object capsule_of(loco::tensor_view<T> v, int device) {
    DLManagedTensor* m = loco::dlpack::export_view(v, device);
    PyObject* c = PyCapsule_New(m, "dltensor", release_capsule);
    if (c == nullptr) {
        m->deleter(m);
        throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(c);
}

// ---- the communicator over Python (torch.distributed) -------------------------------------------

// Calls the methods of a Python object (python/loco/__init__.py: _TorchCollectives) with DLPack
// capsules over loco's own buffers. Blocking collectives: each returns when the result is in
// the buffer (for device memory, the Python side waits for torch's NCCL stream). Bytes are
// counted as the threads communicator counts them (the bytes a reduce-scatter + all-gather ring
// sends), so that bytes_sent() agrees with what loco::diloco reports per sync.
//
// The memory space is the backend's: "host" (gloo: loco's host buffers; the CUDA handle stages
// its exchanges through host memory) or "cuda" (NCCL: loco's device buffers on GPU `device`,
// which the CUDA handle reduces in place).
//
// A callback that fails leaves the communicator broken: the error may have come before the
// callback issued its torch.distributed call (a KeyboardInterrupt, a MemoryError, a CUDA error in
// the synchronisation before it), and the peers' pending collective would then be paired by gloo
// or NCCL with this rank's next one (diloco's one-float agreement): garbage where the sizes match,
// an abort where they do not. Every later collective throws loco::comm_error at once, without
// calling Python; the peers' pending collectives time out in torch.distributed. A KeyboardInterrupt
// or SystemExit (a BaseException that is not an Exception) is also kept (python_interrupts,
// python/bound.hpp), for the handle's call to raise once loco's C++ side has handled the failure.
class python_communicator final : public loco::comm::communicator,
                                  public loco_python::python_interrupts {
public:
    python_communicator(py::object backend, int rank, int size, std::string name,
                        const std::string& space, int device)
        : backend_(std::move(backend)), rank_(rank), size_(size), name_(std::move(name)),
          device_(device) {
        if (rank < 0) {  // torch.distributed's rank in a group this process is not in
            throw loco::invalid_argument("loco: this process is not in the communicator's group "
                                         "(rank " + std::to_string(rank) + "); build the "
                                         "communicator only on the group's ranks");
        }
        if (size < 1 || rank >= size) {
            throw loco::invalid_argument("loco: a communicator of size " + std::to_string(size) +
                                         " has no rank " + std::to_string(rank));
        }
        if (space == "cuda") {
            space_ = loco::memory_space::cuda;
        } else if (space != "host") {
            throw loco::invalid_argument("loco: a communicator moves 'host' or 'cuda' memory, not '" +
                                         space + "'");
        }
    }

    int rank() const noexcept override { return rank_; }
    int size() const noexcept override { return size_; }
    loco::memory_space space() const noexcept override { return space_; }
    int device() const noexcept { return device_; }
    std::string_view name() const noexcept override { return name_; }
    std::uint64_t bytes_sent() const noexcept override {
        return sent_.load(std::memory_order_relaxed);
    }

protected:
    void do_all_reduce(loco::tensor_view<float> data, loco::comm::reduce_op op) override {
        if (size_ > 1 && data.size != 0) {
            call("all_reduce", [&] {
                return std::make_tuple(capsule_of(data, device_),
                                       op == loco::comm::reduce_op::mean);
            });
        }
        const auto m = static_cast<std::uint64_t>(size_);
        const auto r = static_cast<std::uint64_t>(rank_);
        const std::uint64_t n = data.size;
        const std::uint64_t mine = n * (r + 1) / m - n * r / m;
        count_sent(4 * ((m - 1) * mine + (n - mine)));
    }
    void do_all_gather(loco::tensor_view<const std::byte> send,
                       loco::tensor_view<std::byte> recv) override {
        if (send.size != 0) {
            call("all_gather", [&] {
                return std::make_tuple(capsule_of(send, device_), capsule_of(recv, device_));
            });
        }
        count_sent(static_cast<std::uint64_t>(size_ - 1) * send.size);
    }
    void do_all_to_all(loco::tensor_view<const std::byte> send,
                       loco::tensor_view<std::byte> recv) override {
        if (send.size != 0) {
            call("all_to_all", [&] {
                return std::make_tuple(capsule_of(send, device_), capsule_of(recv, device_));
            });
        }
        count_sent(static_cast<std::uint64_t>(size_ - 1) *
                   (send.size / static_cast<std::size_t>(size_)));
    }
    void do_broadcast(loco::tensor_view<std::byte> data, int root) override {
        if (size_ > 1 && data.size != 0) {
            call("broadcast", [&] { return std::make_tuple(capsule_of(data, device_), root); });
        }
        if (rank_ == root) count_sent(static_cast<std::uint64_t>(size_ - 1) * data.size);
    }
    void do_barrier() override {
        call("barrier", [] { return std::make_tuple(); });
    }

private:
    void count_sent(std::uint64_t bytes) noexcept {
        sent_.fetch_add(bytes, std::memory_order_relaxed);
    }
    // Runs backend.<method>(*args()) under the GIL; a Python error becomes loco::comm_error, and
    // any failure breaks the communicator (above).
    template <class Args>
    void call(const char* method, Args&& args) {
        py::gil_scoped_acquire gil;
        if (!broken_.empty()) {
            throw loco::comm_error(prefix(method) + "an earlier " + broken_ +
                                   "; the ranks may now disagree on which "
                                   "collective comes next, so this communicator refuses further "
                                   "collectives: rebuild it (and its process group) to go on");
        }
        try {
            py::object fn = backend_.attr(method);
            std::apply([&](auto&&... a) { fn(a...); }, args());
        } catch (py::error_already_set& e) {
            broken_ = std::string(method) + " failed on this rank";  // first: the rest may throw
            if (!e.matches(PyExc_Exception)) keep_interrupt(e);  // KeyboardInterrupt, SystemExit
            // The exception's type and message on one line: e.what() appends the Python
            // traceback ("At: ...", several lines), which does not belong in loco's sentence.
            std::string what = py::str(e.type().attr("__name__")).cast<std::string>() + ": " +
                               py::str(e.value()).cast<std::string>();
            for (char& c : what) {
                if (c == '\n' || c == '\r') c = ' ';
            }
            broken_ += " (" + what + ")";
            throw loco::comm_error(prefix(method) + "torch.distributed failed (" + what + ")");
        } catch (...) {
            // A C++ error around the callback (out of memory exporting a buffer): the collective
            // may not have been issued either.
            broken_ = std::string(method) + " failed on this rank before its callback ran";
            throw;
        }
    }

    py::object backend_;
    int rank_;
    int size_;
    std::string name_;
    loco::memory_space space_ = loco::memory_space::host;
    int device_;
    // Counted by the collectives (the GIL released, the handle's mutex held) and read by
    // bytes_sent() from any thread holding the GIL: atomic, as comm::threads' and comm::mpi's.
    std::atomic<std::uint64_t> sent_{0};
    std::string broken_;  // the collective that failed, once one has (under the GIL)
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
    // The capsules were read above, under the GIL; the quantizer touches only C++ memory (the
    // caller's frame keeps the tensors alive), so other Python threads run while it works.
    const py::gil_scoped_release nogil;
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
        .def_property_readonly("bytes_sent", &loco::comm::communicator::bytes_sent)
        .def_property_readonly("space", [](const loco::comm::communicator& c) {
            return std::string(loco::to_string(c.space()));
        });
    py::class_<loco::comm::single, loco::comm::communicator>(m, "Single").def(py::init<>());
    py::class_<python_communicator, loco::comm::communicator>(m, "PythonCommunicator")
        .def(py::init<py::object, int, int, std::string, const std::string&, int>(),
             py::arg("backend"), py::arg("rank"), py::arg("size"), py::arg("name"),
             py::arg("space") = "host", py::arg("device") = -1)
        .def_property_readonly("device", &python_communicator::device);

    // The module built against the CPU emulator (python.cuda_emulated, python/CMakeLists.txt)
    // checks the Cuda classes; the CPU ones are loco_python's, and compiling them a second time
    // there would cost the test build a minute of CPU for nothing.
#ifndef LOCO_EMULATED
    loco_python::bind_configurations<loco::host_backend, loco::optimizer>(m, "");
#endif
#ifdef LOCO_PYTHON_CUDA
    loco_python::bind_cuda(m);
    m.attr("has_cuda") = true;
#else
    m.attr("has_cuda") = false;
#endif
    m.def("two_bit_round_trip", &two_bit_round_trip, py::arg("x"), py::arg("out"),
          py::arg("rows") = 0, py::arg("per_row") = false, py::arg("range") = 6.0f);
}
