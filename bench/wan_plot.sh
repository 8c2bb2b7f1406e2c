#!/usr/bin/env bash
# Draws docs/img/wan_gpt2.png and docs/img/wan_paper_1b.png (compute utilisation against link
# bandwidth, docs/wan.md) from bench_wan_projection's tab-separated output with gnuplot.
#
#   bash bench/wan_plot.sh [path/to/bench_wan_projection] [extra options for it]
#
# Default program: build/bench/bench/bench_wan_projection (configure with
# -DLOCO_BUILD_BENCHMARKS=ON). Without gnuplot it says so and draws nothing (Debian: apt-get
# install gnuplot-nox).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
program=${1:-$root/build/bench/bench/bench_wan_projection}
shift || true

if ! command -v gnuplot >/dev/null 2>&1; then
  echo "wan_plot.sh: gnuplot is not installed (Debian: apt-get install gnuplot-nox); no plot drawn"
  exit 0
fi
if [[ ! -x $program ]]; then
  echo "wan_plot.sh: $program is not built; configure with -DLOCO_BUILD_BENCHMARKS=ON and build" \
       "bench_wan_projection, or pass its path" >&2
  exit 1
fi

# The titles name the settings the projection ran with (its defaults unless given; the paper's 1B
# setting keeps its own 0.1 s per step).
step=0.1 workers=4 latency=0
args=("$@")
for ((i = 0; i + 1 < ${#args[@]}; ++i)); do
  case ${args[i]} in
    --step) step=${args[i+1]} ;;
    --workers) workers=${args[i+1]} ;;
    --latency) latency=${args[i+1]} ;;
  esac
done

data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
"$program" --data "$data" "$@" >/dev/null
mkdir -p "$root/docs/img"

plot() {  # plot CSV PNG TITLE
  gnuplot <<EOF
set terminal pngcairo size 900,560 font "sans,11"
set output "$2"
set title "$3"
set logscale x
set xrange [0.01:1000]
set yrange [0:100]
set xlabel "link bandwidth (Gbit/s)"
set ylabel "compute utilisation (%)"
set key left top
set grid
set datafile separator "\t"
plot for [i=2:*] "$1" using 1:i with lines linewidth 2 title columnhead(i)
EOF
}

# The header is "# Gbit/s<TAB>DP<TAB>DiLoCo...": turn it into a column-head line.
for name in gpt2 paper_1b; do
  sed -i '1s/^# //' "$data/$name.tsv"
done
plot "$data/gpt2.tsv" "$root/docs/img/wan_gpt2.png" \
  "GPT-2 124M, M = $workers, $step s per step$([[ $latency != 0 ]] && echo ", $latency s per collective"), H = 100, P = 4, tau = 1 (bytes counted by loco)"
plot "$data/paper_1b.tsv" "$root/docs/img/wan_paper_1b.png" \
  "Streaming DiLoCo's 1B setting: 24 layers, 0.1 s per step$([[ $latency != 0 ]] && echo ", $latency s per collective"), H = 100, M = 2, bf16 / FP4"
echo "wrote docs/img/wan_gpt2.png and docs/img/wan_paper_1b.png"
