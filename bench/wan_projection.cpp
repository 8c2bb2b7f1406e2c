// WAN projection (docs/wan.md): compute utilisation against link bandwidth for data parallelism,
// DiLoCo, Streaming DiLoCo, streaming + overlap and streaming + overlap + 4-bit, from the model of
// bench/wan_model.hpp and the bytes loco counts.
//
//   bench_wan_projection                 the tables of docs/wan.md
//   bench_wan_projection --data DIR      also writes DIR/gpt2.tsv and DIR/paper_1b.tsv, utilisation
//                                        against Gbit/s, tab-separated (bench/wan_plot.sh draws
//                                        them with gnuplot)
// Options: --step S (seconds per inner step of GPT-2 124M, default 0.1), --workers M (for GPT-2,
// default 4), --latency S (seconds per collective, default 0).
//
// Two parts:
//  1. Streaming DiLoCo's Table 4 (algorithms.md 3.3): its three models (1B: 24 layers, 0.1 s a
//     step; 10B: 48, 0.8 s; 100B: 108, 4.9 s), H = 100, fragments of 3 layers, tau = 1, M = 2,
//     the bandwidth each method needs for 50/80/90/95/99 % utilisation, next to the paper's. The
//     bytes per parameter are loco's own at M = 2, read from the handle's accessors on GPT-2
//     small (fp32 all-reduce; blockwise<4, 256> all-gathered), and, for the comparison, the
//     paper's wire (bf16 outer gradients, FP4 for the last column).
//  2. GPT-2 small (124M) at M workers with the bytes of each fragment counted by loco's handle
//     (P = 4 fragments of 3 transformer layers, strided, as the paper's), H = 100.

#include "gpt2_layout.hpp"
#include "wan_model.hpp"

#include <loco/comm/threads.hpp>
#include <loco/loco.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

namespace {

namespace wan = loco_bench::wan;
using four_bit = loco::compress::blockwise<4, 256>;

template <class Compressor, class Schedule>
using handle = loco::diloco<loco::inner::sgd, loco::outer::nesterov, Compressor, Schedule>;

const double targets[5] = {0.50, 0.80, 0.90, 0.95, 0.99};

// A sync of the given tensors sending `bytes` in all, as one piece per transformer layer, each
// layer's share in proportion to its elements (the embeddings and ln_f count with the layers
// by_transformer_layer puts them in).
wan::sync_bytes by_layer(const loco_bench::gpt2_model& model, const std::vector<std::size_t>& list,
                         double bytes) {
    const auto layer_of = loco_bench::by_transformer_layer(model.shape().layers).layer_of;
    std::vector<double> elements(model.shape().layers, 0.0);
    double all = 0;
    for (const std::size_t i : list) {
        const auto& p = model.params()[i];
        elements[layer_of(p)] += static_cast<double>(p.value.size);
        all += static_cast<double>(p.value.size);
    }
    wan::sync_bytes s;
    for (std::size_t l = 0; l < elements.size(); ++l) {
        if (elements[l] > 0) s.push_back({l, bytes * elements[l] / all});
    }
    return s;
}

// Each fragment's sync as loco sends it from rank 0 (exchange and agreement): the streaming
// handle says which tensors each fragment holds; a one-fragment handle over those tensors says
// what a sync of them sends. fragments = 1: the whole model.
template <class Compressor>
std::vector<wan::sync_bytes> fragment_syncs(const loco_bench::gpt2_model& model, int workers,
                                            std::uint64_t fragments) {
    auto group = std::make_shared<loco::comm::thread_group>(workers);
    loco::comm::threads rank0(group, 0);  // no collective runs: accessors only
    std::vector<std::vector<std::size_t>> lists;
    {
        typename handle<Compressor, loco::schedule::streaming>::config cfg;
        cfg.schedule = {.every = 100, .fragments = fragments, .overlap = 1, .alpha = 0.5f};
        cfg.fragments = loco_bench::by_transformer_layer(model.shape().layers);
        handle<Compressor, loco::schedule::streaming> opt(model.params(), rank0, cfg);
        for (std::size_t f = 0; f < opt.fragments(); ++f) {
            lists.emplace_back(opt.fragment_params(f).begin(), opt.fragment_params(f).end());
        }
    }
    std::vector<wan::sync_bytes> syncs;
    for (const auto& list : lists) {
        loco::parameter_list part;
        for (const std::size_t i : list) {
            const auto& p = model.params()[i];
            part.add_views(p.name, p.value, p.grad, p.options());
        }
        handle<Compressor, loco::schedule::every> opt(part, rank0);
        syncs.push_back(by_layer(model, list, static_cast<double>(opt.bytes_per_sync())));
    }
    return syncs;
}

double bytes_of(const wan::sync_bytes& s) {
    double b = 0;
    for (const auto& p : s) b += p.bytes;
    return b;
}
double total(const std::vector<wan::sync_bytes>& v) {
    double b = 0;
    for (const auto& s : v) b += bytes_of(s);
    return b;
}

struct column {
    std::string name;
    wan::method m;
};

// The five methods of Table 4 for a model of `params` parameters and `layers` layers, whole-model
// syncs sending `full` bytes per parameter and 4-bit ones `packed`, fragments of 3 layers.
std::vector<column> paper_columns(double params, std::size_t layers, double full, double packed) {
    const std::size_t p = layers / 3;
    const auto fragments = [&](double bytes_per_param) {
        std::vector<wan::sync_bytes> syncs;
        for (std::size_t f = 0; f < p; ++f) {
            syncs.push_back(wan::spread(params * bytes_per_param / static_cast<double>(p),
                                        wan::strided_layers(f, p, layers)));
        }
        return syncs;
    };
    const wan::sync_bytes whole = wan::spread(params * full, wan::all_layers(layers));
    return {
        {"DP", {{whole}, 1, 0}},
        {"DiLoCo", {{whole}, 100, 0}},
        {"Streaming", {fragments(full), 100, 0}},
        {"+ overlap", {fragments(full), 100, 1}},
        {"+ overlap + 4-bit", {fragments(packed), 100, 1}},
    };
}

// A grid point as the paper prints it. Its labels are not all the grid points rounded to one
// decimal: it prints 0.954 as 0.9, 1.151 as 1.1, 2.947 as 3.0, 6.251 as 6.2, 86.851 as 86.8 and
// 323.746 as 323.8 (perhaps a grid computed slightly differently); those take its label.
std::string grid_label(double gbits) {
    if (std::isinf(gbits)) return "-";
    static const double points[][2] = {{0.954, 0.9}, {1.151, 1.1},   {2.947, 3.0},
                                       {6.251, 6.2}, {86.851, 86.8}, {323.746, 323.8}};
    double shown = gbits;
    for (const auto& p : points) {
        if (std::abs(gbits - p[0]) <= 1e-3 * p[0]) shown = p[1];
    }
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f", shown);
    return buf;
}

std::string gbits(double bps) {
    if (std::isinf(bps)) return "-";
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f", bps / 1e9);
    return buf;
}

void write_table(const std::string& path, const std::vector<column>& cols, const wan::step_model& c,
               double latency) {
    std::ofstream out(path);
    out << "# Gbit/s";
    for (const auto& col : cols) out << "\t" << col.name;
    out << "\n";
    for (int k = 0; k <= 120; ++k) {
        const double g = std::pow(10.0, -2.0 + 5.0 * k / 120.0);  // 0.01 to 1000 Gbit/s
        out << g;
        for (const auto& col : cols) out << "\t" << 100.0 * wan::utilisation(col.m, c, {g * 1e9, latency});
        out << "\n";
    }
    if (!out) {
        std::fprintf(stderr, "bench_wan_projection: cannot write %s\n", path.c_str());
        std::exit(1);
    }
}

}  // namespace

int main(int argc, char** argv) {
    std::string data_dir;
    double step = 0.1, latency = 0.0;
    int workers = 4;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        const bool has = i + 1 < argc;
        if (a == "--data" && has) {
            data_dir = argv[++i];
        } else if (a == "--step" && has) {
            step = std::strtod(argv[++i], nullptr);
        } else if (a == "--latency" && has) {
            latency = std::strtod(argv[++i], nullptr);
        } else if (a == "--workers" && has) {
            workers = std::atoi(argv[++i]);
        } else {
            std::fprintf(stderr, "usage: %s [--data DIR] [--step S] [--latency S] [--workers M]\n",
                         argv[0]);
            return 2;
        }
    }
    if (!(step > 0) || !(latency >= 0) || workers < 2) {
        std::fprintf(stderr, "bench_wan_projection: --step must be > 0, --latency >= 0 and "
                             "--workers >= 2\n");
        return 2;
    }

    const loco_bench::gpt2_model model(loco_bench::gpt2_small);
    const double n = static_cast<double>(model.params().total_elements());

    // ---- 1. Table 4 -------------------------------------------------------------------------
    const double fp32_m2 = total(fragment_syncs<loco::compress::none>(model, 2, 4)) / n;
    const double four_m2 = total(fragment_syncs<four_bit>(model, 2, 4)) / n;
    std::printf("Bytes per parameter per sync at M = 2, counted by loco on GPT-2 small: fp32 "
                "all-reduce %.4f, blockwise<4, 256> all-gather %.4f\n\n", fp32_m2, four_m2);

    struct paper_model {
        const char* name;
        double params;
        std::size_t layers;
        double step;
        double table4[5][5];  // the paper's Gbit/s, per column, for 50/80/90/95/99 %
    };
    const paper_model models[3] = {
        {"1B", 1e9, 24, 0.1,
         {{86.8, 152.6, 184.2, 222.3, 569.0}, {1.4, 6.2, 13.3, 23.3, 86.8},
          {1.4, 5.2, 9.1, 16.0, 28.1}, {1.4, 4.3, 6.2, 9.1, 11.0}, {0.4, 0.9, 1.7, 2.0, 3.0}}},
        {"10B", 10e9, 48, 0.8,
         {{104.8, 222.3, 222.3, 268.3, 471.5}, {1.7, 7.5, 16.0, 33.9, 104.8},
          {1.7, 5.2, 9.1, 13.3, 19.3}, {1.7, 3.6, 5.2, 6.2, 7.5}, {0.4, 0.9, 1.4, 1.4, 1.7}}},
        {"100B", 100e9, 108, 4.9,
         {{184.2, 323.8, 390.7, 390.7, 471.5}, {3.0, 11.0, 23.3, 49.4, 184.2},
          {2.4, 6.2, 9.1, 11.0, 19.3}, {1.7, 3.6, 4.3, 5.2, 5.2}, {0.5, 0.9, 1.1, 1.1, 1.4}}},
    };
    // One factor on the bytes that lines the model up with the paper (docs/wan.md): the paper
    // does not give its models' exact parameter counts or its unit of Gbit.
    const double calibration = 0.84;
    std::printf("Table 4 (Gbit/s for 50/80/90/95/99 %% utilisation; H = 100, 3-layer fragments, "
                "tau = 1, M = 2, latency %.3g s): the paper; this model on the paper's wire (bf16, "
                "FP4), snapped up to the paper's grid, as is and with the bytes scaled; and on "
                "loco's wire (fp32, blockwise<4, 256>)\n\n", latency);
    std::printf("| model | method | paper | model, bf16/FP4 | same, bytes x %.2f | model, loco's "
                "bytes (not snapped) |\n|---|---|---|---|---|---|\n", calibration);
    int matched = 0, matched_calibrated = 0, entries = 0;
    for (const auto& pm : models) {
        const wan::step_model c{pm.step, pm.layers, 1.0 / 3};
        const auto paper_wire = paper_columns(pm.params, pm.layers, 2.0, 0.5);
        const auto calibrated = paper_columns(pm.params, pm.layers, 2.0 * calibration, 0.5 * calibration);
        const auto loco_wire = paper_columns(pm.params, pm.layers, fp32_m2, four_m2);
        for (std::size_t k = 0; k < paper_wire.size(); ++k) {
            std::string paper, ours, cal, loco_s;
            for (int t = 0; t < 5; ++t) {
                const std::string sep = t ? "/" : "";
                char buf[16];
                std::snprintf(buf, sizeof buf, "%.1f", pm.table4[k][t]);
                const auto on_grid = [&](const wan::method& m) {
                    return grid_label(wan::paper_grid_ceil(
                        wan::bandwidth_for(m, c, targets[t], latency) / 1e9));
                };
                const std::string a = on_grid(paper_wire[k].m), b = on_grid(calibrated[k].m);
                matched += a == buf;
                matched_calibrated += b == buf;
                ++entries;
                paper += sep + buf;
                ours += sep + (a == buf ? a : "**" + a + "**");
                cal += sep + (b == buf ? b : "**" + b + "**");
                loco_s += sep + gbits(wan::bandwidth_for(loco_wire[k].m, c, targets[t], latency));
            }
            std::printf("| %s (%zu, %.1f s) | %s | %s | %s | %s | %s |\n", pm.name, pm.layers,
                        pm.step, paper_wire[k].name.c_str(), paper.c_str(), ours.c_str(),
                        cal.c_str(), loco_s.c_str());
        }
        if (!data_dir.empty() && std::string(pm.name) == "1B") {
            write_table(data_dir + "/paper_1b.tsv", paper_wire, c, latency);
        }
    }

    std::printf("\nEqual to the paper's grid value (bold: different): %d of %d entries on the "
                "paper's wire, %d of %d with the bytes x %.2f\n", matched, entries,
                matched_calibrated, entries, calibration);

    // ---- 2. GPT-2 small with loco's bytes -----------------------------------------------------
    const auto dense = fragment_syncs<loco::compress::none>(model, workers, 4);
    const auto packed = fragment_syncs<four_bit>(model, workers, 4);
    const auto whole = fragment_syncs<loco::compress::none>(model, workers, 1);
    // Data parallelism: the fp32 all-reduce of the whole model, without the agreement.
    wan::sync_bytes all_reduce = whole.front();
    {
        auto group = std::make_shared<loco::comm::thread_group>(workers);
        loco::comm::threads rank0(group, 0);
        handle<loco::compress::none, loco::schedule::every> opt(model.params(), rank0);
        const double scale = static_cast<double>(opt.bytes_per_sync() - opt.agreement_bytes_per_sync()) /
                             bytes_of(all_reduce);
        for (auto& p : all_reduce) p.bytes *= scale;
    }
    const std::vector<column> gpt2{
        {"DP", {{all_reduce}, 1, 0}},
        {"DiLoCo", {whole, 100, 0}},
        {"Streaming", {dense, 100, 0}},
        {"+ overlap", {dense, 100, 1}},
        {"+ overlap + 4-bit", {packed, 100, 1}},
        // Not in the paper's table: the longest overlap the schedule allows (tau < H / P).
        {"+ overlap tau = 24 + 4-bit", {packed, 100, 24}},
    };
    std::printf("\nGPT-2 small (124M, 12 layers), M = %d, %.3g s per inner step, H = 100, P = 4 "
                "fragments of 3 layers (strided; wte and wpe with layer 0), tau = 1; bytes rank 0 "
                "sends, counted by loco:\n\n", workers, step);
    std::printf("| method | bytes per sync (MB) | Gbit/s for 50/80/90/95/99 %% | utilisation at "
                "0.1 / 1 / 10 Gbit/s |\n|---|---|---|---|\n");
    const wan::step_model c{step, 12, 1.0 / 3};
    for (const auto& col : gpt2) {
        std::string need, at, sizes;
        for (int t = 0; t < 5; ++t) {
            need += (t ? "/" : "") + gbits(wan::bandwidth_for(col.m, c, targets[t], latency));
        }
        for (const double g : {0.1, 1.0, 10.0}) {
            char buf[16];
            std::snprintf(buf, sizeof buf, "%s%.1f %%", at.empty() ? "" : " / ",
                          100.0 * wan::utilisation(col.m, c, {g * 1e9, latency}));
            at += buf;
        }
        for (const auto& s : col.m.syncs) {
            char buf[24];
            std::snprintf(buf, sizeof buf, "%s%.1f", sizes.empty() ? "" : " + ", bytes_of(s) / 1e6);
            sizes += buf;
        }
        std::printf("| %s | %s | %s | %s |\n", col.name.c_str(), sizes.c_str(), need.c_str(),
                    at.c_str());
    }
    if (!data_dir.empty()) {
        write_table(data_dir + "/gpt2.tsv", gpt2, c, latency);
        std::printf("\nwrote %s/gpt2.tsv and %s/paper_1b.tsv\n", data_dir.c_str(), data_dir.c_str());
    }
    return 0;
}
