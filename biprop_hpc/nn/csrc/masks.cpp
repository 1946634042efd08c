// CPU kernels of the BIPROP layers (called by biprop_hpc/nn/layers.py, built by biprop_hpc/extensions.py): the
// effective weight and its score gradient,
// each in a fixed, small number of passes over the layer and one output allocation.
//
//   effective_weight(S, W, n_keep) = sign(W) * alpha * M      (M: the n_keep largest |S|, ties to the lower
//                                                               flat index; alpha = sum(|W| M) / n_keep)
//   score_gradient(G, S, W)        = G * W * sign(S)
//
// Selection works on the bits of |S|: non-negative floats order like their bit patterns as unsigned integers
// (NaN above +inf), so every comparison is an integer one and the order is total. A strided sample of 8192
// keys brackets the threshold between two sample keys lo <= hi (4 standard deviations of the sample rank
// either side). Pass 1 over the layer, in fixed chunks: sum |W| over keys > hi (kept for sure), count keys
// < lo, and collect the band lo <= key <= hi (flat index, key, |W|; in index order, a few % of the layer).
// The threshold is the right order statistic of the band (nth_element); ties at it are kept in the band's
// index order until n_keep is reached, so the last kept tie's index decides every tie; alpha adds the |W| of
// the kept band entries. Pass 2 writes W_eff. If the band misses the threshold (an unlucky sample) the band
// is the whole layer, so the result is always exact. Small layers take that way directly.
//
// Deterministic whatever the thread count: chunks have a fixed size, and partial sums (float64) are added in
// chunk order. Float and double; other dtypes use the torch path in layers.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using i64 = int64_t;
constexpr i64 kChunk = 1 << 16;
constexpr i64 kSample = 8192;
constexpr int kLanes = 8;

template <typename T>   // 16-bit keys: at::Half and at::BFloat16 scores (global_kept_counts only)
using Key = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;

template <typename T>
inline Key<T> bits_of(T value) {
  Key<T> bits;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
inline T from_bits(Key<T> bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

template <typename T>
inline Key<T> all_if(bool condition) {   // all ones if condition else 0: a select without a branch
  return Key<T>(0) - Key<T>(condition);
}

template <typename T>
constexpr Key<T> kSignBit = Key<T>(1) << (8 * sizeof(T) - 1);

template <typename T>
inline Key<T> magnitude_key(T value) {   // the bits of |value|
  return bits_of(value) & ~kSignBit<T>;
}

// The hot loops, compiled twice (AVX2 and baseline x86-64, chosen when the library loads) and written in
// integer selects, without branches on the keys (which are random), so that they vectorise. Sums run in
// kLanes independent float64 accumulators: the same order of additions on every machine and thread count.

// Over n entries: sum of |W| where key > hi, and the count of keys < lo.
template <typename T>
__attribute__((target_clones("avx2", "default")))
void sums_outside_band(const T* s, const T* w, i64 n, Key<T> lo, Key<T> hi, double& sum_above, i64& count_below) {
  double sum[kLanes] = {};
  i64 count[kLanes] = {};
  auto add = [&](i64 i, int l) {
    const Key<T> key = magnitude_key(s[i]);
    sum[l] += static_cast<double>(from_bits<T>(magnitude_key(w[i]) & all_if<T>(key > hi)));
    count[l] += key < lo;
  };
  i64 i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) add(i + l, l);
  }
  for (int l = 0; i < n; ++i, ++l) add(i, l);
  sum_above = 0.0;
  count_below = 0;
  for (int l = 0; l < kLanes; ++l) {
    sum_above += sum[l];
    count_below += count[l];
  }
}

template <typename T>
struct BandEntry {
  i64 index;         // flat index in the layer
  Key<T> key;        // |S| as bits
  T magnitude;       // |W|
};

// The entries with keys in [lo, hi] among n starting at flat index `first`, in order, into `band`.
// One unsigned compare per key, true for a few % of them: a well-predicted branch.
template <typename T>
__attribute__((target_clones("avx2", "default")))
void band_entries(const T* s, const T* w, i64 n, i64 first, Key<T> lo, Key<T> hi, std::vector<BandEntry<T>>& band) {
  band.clear();
  const Key<T> width = hi - lo;
  for (i64 i = 0; i < n; ++i) {
    const Key<T> key = magnitude_key(s[i]);
    if (Key<T>(key - lo) <= width) band.push_back({first + i, key, from_bits<T>(magnitude_key(w[i]))});
  }
}

// out = sign(W) * alpha * (key >= threshold): +-alpha where kept and W != 0, else 0 signed as W (as torch's
// sign(W).mul_(alpha).mul_(M) leaves it).
template <typename T>
__attribute__((target_clones("avx2", "default")))
void write_kept(const T* __restrict s, const T* __restrict w, T* __restrict out, i64 n, Key<T> threshold, T alpha) {
  const Key<T> alpha_bits = bits_of(alpha);
  for (i64 i = 0; i < n; ++i) {
    const Key<T> weight = bits_of(w[i]);
    const Key<T> kept = all_if<T>(magnitude_key(s[i]) >= threshold) & all_if<T>((weight & ~kSignBit<T>) != 0);
    out[i] = from_bits<T>((weight & kSignBit<T>) | (alpha_bits & kept));
  }
}

// out = sign(S) * W * G: W * G with S's sign, 0 where S is 0.
template <typename T>
__attribute__((target_clones("avx2", "default")))
void write_score_gradient(const T* __restrict g, const T* __restrict s, const T* __restrict w, T* __restrict out,
                          i64 n) {
  for (i64 i = 0; i < n; ++i) {
    const Key<T> score = bits_of(s[i]);
    const Key<T> product = bits_of(w[i] * g[i]);
    out[i] = from_bits<T>((product ^ (score & kSignBit<T>)) & all_if<T>((score & ~kSignBit<T>) != 0));
  }
}

template <typename T>
struct Selection {
  Key<T> threshold;      // the n_keep-th largest key
  i64 last_tie;          // ties at the threshold with a flat index <= last_tie are kept, those after it not
  bool dropped_ties;     // whether there are ties after last_tie (rare: scores rarely tie)
  double alpha;
};

// Buffers of the selection (layerwise and global), kept per thread from call to call: allocating them anew each time costs more in
// page faults than the selection itself (fresh pages of large allocations are faulted in one by one).
template <typename T>
struct Scratch {
  std::vector<double> sure_sum;
  std::vector<i64> below;
  std::vector<std::vector<BandEntry<T>>> band;   // per chunk: the band's entries, in index order
  std::vector<Key<T>> order;

  static Scratch& of_this_thread() {
    thread_local Scratch scratch;
    return scratch;
  }
};

template <typename T>
bool select_in_band(const T* s, const T* w, i64 n, i64 n_keep, Key<T> lo, Key<T> hi, Selection<T>& out) {
  const i64 chunks = (n + kChunk - 1) / kChunk;
  Scratch<T>& scratch = Scratch<T>::of_this_thread();
  scratch.sure_sum.assign(chunks, 0.0);
  scratch.below.assign(chunks, 0);
  if (static_cast<i64>(scratch.band.size()) < chunks) scratch.band.resize(chunks);
  at::parallel_for(0, chunks, 1, [&](i64 first, i64 last) {
    for (i64 c = first; c < last; ++c) {
      const i64 begin = c * kChunk, end = std::min(n, begin + kChunk);
      // Sums and counts, then the band (a few % of the chunk) from the L2 cache.
      sums_outside_band(s + begin, w + begin, end - begin, lo, hi, scratch.sure_sum[c], scratch.below[c]);
      band_entries(s + begin, w + begin, end - begin, begin, lo, hi, scratch.band[c]);
    }
  });
  i64 below_lo = 0, band_size = 0;
  double alpha_sum = 0.0;
  for (i64 c = 0; c < chunks; ++c) {
    below_lo += scratch.below[c];
    band_size += static_cast<i64>(scratch.band[c].size());
    alpha_sum += scratch.sure_sum[c];
  }
  const i64 above_hi = n - below_lo - band_size;
  // The threshold is the (n - n_keep)-th smallest key (0-based) overall, so this one within the band.
  const i64 rank = n - n_keep - below_lo;
  if (rank < 0 || rank >= band_size) return false;
  std::vector<Key<T>>& order = scratch.order;
  order.clear();
  for (i64 c = 0; c < chunks; ++c) {
    for (const BandEntry<T>& entry : scratch.band[c]) order.push_back(entry.key);
  }
  std::nth_element(order.begin(), order.begin() + rank, order.end());
  const Key<T> threshold = order[rank];
  // Band entries above the threshold are kept; ties at it in flat index order while n_keep is not reached.
  i64 ties_to_keep = n_keep - above_hi - (band_size - 1 - rank);
  for (i64 j = rank + 1; j < band_size; ++j) ties_to_keep += order[j] == threshold;  // ties placed after rank
  i64 last_tie = -1;
  bool dropped_ties = false;
  for (i64 c = 0; c < chunks; ++c) {
    for (const BandEntry<T>& entry : scratch.band[c]) {
      const bool tie_kept = entry.key == threshold && ties_to_keep > 0;
      dropped_ties |= entry.key == threshold && !tie_kept;
      ties_to_keep -= tie_kept;
      last_tie = tie_kept ? entry.index : last_tie;
      alpha_sum += static_cast<double>(entry.magnitude) * static_cast<double>((entry.key > threshold) | tie_kept);
    }
  }
  out = {threshold, last_tie, dropped_ties, alpha_sum / static_cast<double>(n_keep)};
  return true;
}

template <typename T>
Selection<T> select(const T* s, const T* w, i64 n, i64 n_keep) {
  Selection<T> result{};
  if (n > 4 * kSample) {
    const i64 stride = n / kSample;
    std::vector<Key<T>> sample;
    sample.reserve(n / stride + 1);
    for (i64 i = 0; i < n; i += stride) sample.push_back(magnitude_key(s[i]));
    std::sort(sample.begin(), sample.end());
    const i64 m = static_cast<i64>(sample.size());
    const double position = static_cast<double>(n - n_keep) / static_cast<double>(n - 1) * (m - 1);
    const double margin = 4.0 * std::sqrt(static_cast<double>(m)) / 2.0 + 2.0;
    const Key<T> lo = sample[std::max<i64>(static_cast<i64>(position - margin), 0)];
    const Key<T> hi = sample[std::min<i64>(static_cast<i64>(position + margin) + 1, m - 1)];
    if (select_in_band(s, w, n, n_keep, lo, hi, result)) return result;
  }
  select_in_band(s, w, n, n_keep, Key<T>(0), std::numeric_limits<Key<T>>::max(), result);  // band = all
  return result;
}

template <typename T>
void write_effective(const T* s, const T* w, T* out, i64 n, const Selection<T>& sel) {
  const T alpha = static_cast<T>(sel.alpha);
  at::parallel_for(0, n, kChunk, [&](i64 first, i64 last) {
    write_kept(s + first, w + first, out + first, last - first, sel.threshold, alpha);
  });
  if (sel.dropped_ties) {   // write_kept kept every tie: drop those after the last kept one
    for (i64 i = sel.last_tie + 1; i < n; ++i) {
      if (magnitude_key(s[i]) == sel.threshold) out[i] *= T(0);
    }
  }
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), what, ": dtypes differ");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, what, ": float or double only");
  TORCH_CHECK(a.sizes() == b.sizes(), what, ": shapes differ");
}

at::Tensor effective_weight(const at::Tensor& scores, const at::Tensor& weight, int64_t n_keep) {
  check_pair(scores, weight, "effective_weight");
  const i64 n = scores.numel();
  TORCH_CHECK(n_keep >= 1 && n_keep <= std::max<i64>(n, 1), "effective_weight: n_keep out of range");
  const at::Tensor s = scores.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "effective_weight", [&] {
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    Selection<scalar_t> sel{};
    if (n_keep < n) {
      sel = select(sp, wp, n, n_keep);
    } else {   // keep all: threshold 0 keeps every key; alpha is the mean |W|
      std::vector<double> sums((n + kChunk - 1) / kChunk);
      std::vector<i64> unused(sums.size());
      at::parallel_for(0, static_cast<i64>(sums.size()), 1, [&](i64 first, i64 last) {
        for (i64 c = first; c < last; ++c) {   // |W| summed where |W|'s key > 0: all of it
          const i64 begin = c * kChunk, end = std::min(n, begin + kChunk);
          sums_outside_band(wp + begin, wp + begin, end - begin, Key<scalar_t>(0), Key<scalar_t>(0), sums[c],
                            unused[c]);
        }
      });
      sel.alpha = std::accumulate(sums.begin(), sums.end(), 0.0) / static_cast<double>(n);
    }
    write_effective(sp, wp, out.mutable_data_ptr<scalar_t>(), n, sel);
  });
  return out;
}

at::Tensor score_gradient(const at::Tensor& grad, const at::Tensor& scores, const at::Tensor& weight) {
  check_pair(scores, weight, "score_gradient");
  check_pair(grad, weight, "score_gradient");
  const at::Tensor g = grad.contiguous(), s = scores.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "score_gradient", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.numel(), kChunk, [&](i64 first, i64 last) {
      write_score_gradient(gp + first, sp + first, wp + first, op + first, last - first);
    });
  });
  return out;
}


// ---- Global pruning (biprop_hpc/nn/global_prune.py): one threshold over the |S| of all layers together ----
//
// The layers' scores are read where they lie (no concatenation); "flat order" is the layers in list order, each
// in its own flat order. The K-th largest key T over all of them is found as one layer's threshold is above: one
// strided sample over all layers brackets T between lo <= hi, one pass over every layer's chunks counts the keys
// below lo (and, for W_eff, sums |W| over keys above hi per layer) and collects the band, and T is an order
// statistic of the band (the band is every key when the sample misses). Each layer keeps its keys > T plus the
// ties at T in flat order while K is not reached, which is exactly its own top-n_l with ties to the lower flat
// index. So global_effective_weights writes each layer's W_eff straight from T and its last kept tie, in the same
// two passes as effective_weight: the global masks cost about what the layerwise ones cost, not a selection more.
// A layer left with nothing keeps 1 weight, its largest |S| (effective_weight with n_keep 1); both ops return
// each layer's count with that rule applied.

struct Piece {   // one chunk of one layer
  i64 layer, begin, end;
};

template <typename T>
struct GlobalSelection {
  Key<T> threshold;
  std::vector<i64> counts;          // per layer: keys > T plus its kept ties (0: the layer collapses)
  std::vector<i64> last_tie;        // per layer, as in Selection
  std::vector<char> dropped_ties;   // per layer, as in Selection
  std::vector<double> kept_sum;     // per layer: sum of |W| over what it keeps (with weights only)
};

// Over n entries: the count of keys < lo.
template <typename T>
__attribute__((target_clones("avx2", "default")))
i64 count_below(const T* s, i64 n, Key<T> lo) {
  i64 count[kLanes] = {};
  i64 i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) count[l] += magnitude_key(s[i + l]) < lo;
  }
  for (int l = 0; i < n; ++i, ++l) count[l] += magnitude_key(s[i]) < lo;
  return std::accumulate(count, count + kLanes, i64(0));
}

// kWeights: also the per-layer sums of |W| over what each layer keeps (w: one pointer per layer).
template <typename T, bool kWeights>
bool global_select_in_band(const std::vector<const T*>& s, const std::vector<const T*>& w, const std::vector<Piece>& pieces,
                           i64 n, i64 n_keep, Key<T> lo, Key<T> hi, GlobalSelection<T>& out) {
  const i64 m = static_cast<i64>(pieces.size());
  Scratch<T>& scratch = Scratch<T>::of_this_thread();   // per piece instead of per chunk
  scratch.sure_sum.assign(m, 0.0);
  scratch.below.assign(m, 0);
  if (static_cast<i64>(scratch.band.size()) < m) scratch.band.resize(m);
  at::parallel_for(0, m, 1, [&](i64 first, i64 last) {
    for (i64 p = first; p < last; ++p) {
      const Piece& piece = pieces[p];
      const T* sp = s[piece.layer] + piece.begin;
      const i64 size = piece.end - piece.begin;
      if constexpr (kWeights) {
        const T* wp = w[piece.layer] + piece.begin;
        sums_outside_band(sp, wp, size, lo, hi, scratch.sure_sum[p], scratch.below[p]);
        band_entries(sp, wp, size, piece.begin, lo, hi, scratch.band[p]);
      } else {
        scratch.below[p] = count_below(sp, size, lo);
        band_entries(sp, sp, size, piece.begin, lo, hi, scratch.band[p]);   // |S| as the unused magnitude
      }
    }
  });
  i64 below_lo = 0, band_size = 0;
  for (i64 p = 0; p < m; ++p) {
    below_lo += scratch.below[p];
    band_size += static_cast<i64>(scratch.band[p].size());
  }
  // T is the (n - n_keep)-th smallest key (0-based) overall, so this one within the band.
  const i64 rank = n - n_keep - below_lo;
  if (rank < 0 || rank >= band_size) return false;
  std::vector<Key<T>>& order = scratch.order;
  order.clear();
  for (i64 p = 0; p < m; ++p) {
    for (const BandEntry<T>& entry : scratch.band[p]) order.push_back(entry.key);
  }
  std::nth_element(order.begin(), order.begin() + rank, order.end());
  const Key<T> threshold = order[rank];
  i64 band_above = 0;
  for (const Key<T> key : order) band_above += key > threshold;
  // Every key above hi is kept; then each layer's band keys above T, and ties at T in flat order up to n_keep.
  i64 ties_to_keep = n_keep - (n - below_lo - band_size) - band_above;
  const i64 layers = static_cast<i64>(s.size());
  out.threshold = threshold;
  out.counts.assign(layers, 0);
  out.last_tie.assign(layers, -1);
  out.dropped_ties.assign(layers, 0);
  out.kept_sum.assign(layers, 0.0);
  for (i64 p = 0; p < m; ++p) {   // chunk sums first, in order: the summation order of select_in_band
    const Piece& piece = pieces[p];
    out.counts[piece.layer] += piece.end - piece.begin - scratch.below[p] - static_cast<i64>(scratch.band[p].size());
    out.kept_sum[piece.layer] += scratch.sure_sum[p];
  }
  for (i64 p = 0; p < m; ++p) {
    const i64 layer = pieces[p].layer;
    for (const BandEntry<T>& entry : scratch.band[p]) {
      const bool tie = entry.key == threshold;
      const bool kept = entry.key > threshold || (tie && ties_to_keep > 0);
      ties_to_keep -= tie && kept;
      out.dropped_ties[layer] |= tie && !kept;
      out.last_tie[layer] = tie && kept ? entry.index : out.last_tie[layer];
      out.counts[layer] += kept;
      if constexpr (kWeights) out.kept_sum[layer] += kept ? static_cast<double>(entry.magnitude) : 0.0;
    }
  }
  return true;
}

template <typename T, bool kWeights>
GlobalSelection<T> global_select(const std::vector<const T*>& s, const std::vector<const T*>& w,
                                 const std::vector<i64>& sizes, i64 n_keep) {
  std::vector<Piece> pieces;
  i64 n = 0;
  for (i64 l = 0; l < static_cast<i64>(sizes.size()); ++l) {
    for (i64 begin = 0; begin < sizes[l]; begin += kChunk) pieces.push_back({l, begin, std::min(sizes[l], begin + kChunk)});
    n += sizes[l];
  }
  GlobalSelection<T> result{};
  if (n > 4 * kSample) {   // the sample strides over the layers laid end to end
    const i64 stride = n / kSample;
    std::vector<Key<T>> sample;
    sample.reserve(n / stride + 1);
    i64 layer = 0, start = 0;
    for (i64 i = 0; i < n; i += stride) {
      while (i >= start + sizes[layer]) start += sizes[layer++];
      sample.push_back(magnitude_key(s[layer][i - start]));
    }
    std::sort(sample.begin(), sample.end());
    const i64 m = static_cast<i64>(sample.size());
    const double position = static_cast<double>(n - n_keep) / static_cast<double>(n - 1) * (m - 1);
    const double margin = 4.0 * std::sqrt(static_cast<double>(m)) / 2.0 + 2.0;
    const Key<T> lo = sample[std::max<i64>(static_cast<i64>(position - margin), 0)];
    const Key<T> hi = sample[std::min<i64>(static_cast<i64>(position + margin) + 1, m - 1)];
    if (global_select_in_band<T, kWeights>(s, w, pieces, n, n_keep, lo, hi, result)) return result;
  }
  global_select_in_band<T, kWeights>(s, w, pieces, n, n_keep, Key<T>(0), std::numeric_limits<Key<T>>::max(), result);
  return result;
}

// The layers' sizes, after checking that `scores` are CPU tensors of one floating dtype and n_keep in [1, n].
std::vector<i64> check_layers(at::TensorList scores, int64_t n_keep, const char* what) {
  TORCH_CHECK(!scores.empty(), what, ": no layers");
  std::vector<i64> sizes;
  i64 n = 0;
  for (const at::Tensor& s : scores) {
    TORCH_CHECK(s.device().is_cpu(), what, ": CPU tensors only");
    TORCH_CHECK(s.scalar_type() == scores[0].scalar_type(), what, ": the layers' dtypes differ");
    sizes.push_back(s.numel());
    n += s.numel();
  }
  TORCH_CHECK(n_keep >= 1 && n_keep <= n, what, ": n_keep out of range");
  return sizes;
}

std::vector<int64_t> global_kept_counts(at::TensorList scores, int64_t n_keep) {
  std::vector<i64> sizes = check_layers(scores, n_keep, "global_kept_counts");
  if (n_keep == std::accumulate(sizes.begin(), sizes.end(), i64(0))) return sizes;
  std::vector<at::Tensor> contiguous;
  for (const at::Tensor& s : scores) contiguous.push_back(s.contiguous());
  std::vector<int64_t> counts;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores[0].scalar_type(), "global_kept_counts", [&] {
    std::vector<const scalar_t*> s;
    for (const at::Tensor& t : contiguous) s.push_back(t.const_data_ptr<scalar_t>());
    const GlobalSelection<scalar_t> selection = global_select<scalar_t, false>(s, {}, sizes, n_keep);
    for (const i64 count : selection.counts) counts.push_back(std::max<i64>(count, 1));
  });
  return counts;
}

std::tuple<std::vector<at::Tensor>, std::vector<int64_t>> global_effective_weights(at::TensorList scores,
                                                                                   at::TensorList weights,
                                                                                   int64_t n_keep) {
  std::vector<i64> sizes = check_layers(scores, n_keep, "global_effective_weights");
  TORCH_CHECK(weights.size() == scores.size(), "global_effective_weights: as many weights as scores");
  std::vector<at::Tensor> s, w, out;
  for (size_t l = 0; l < scores.size(); ++l) {
    check_pair(scores[l], weights[l], "global_effective_weights");
    s.push_back(scores[l].contiguous());
    w.push_back(weights[l].contiguous());
  }
  std::vector<int64_t> counts(sizes);
  if (n_keep == std::accumulate(sizes.begin(), sizes.end(), i64(0))) {
    for (size_t l = 0; l < s.size(); ++l) out.push_back(effective_weight(s[l], w[l], sizes[l]));
    return {out, counts};
  }
  AT_DISPATCH_FLOATING_TYPES(w[0].scalar_type(), "global_effective_weights", [&] {
    std::vector<const scalar_t*> sp, wp;
    for (size_t l = 0; l < s.size(); ++l) {
      sp.push_back(s[l].const_data_ptr<scalar_t>());
      wp.push_back(w[l].const_data_ptr<scalar_t>());
    }
    const GlobalSelection<scalar_t> selection = global_select<scalar_t, true>(sp, wp, sizes, n_keep);
    for (size_t l = 0; l < s.size(); ++l) {
      const i64 count = selection.counts[l];
      if (count == 0) {   // the layer collapses: it keeps its largest |S|
        out.push_back(effective_weight(s[l], w[l], 1));
        counts[l] = 1;
        continue;
      }
      at::Tensor layer_out = at::empty_like(w[l], at::MemoryFormat::Contiguous);
      const Selection<scalar_t> own{selection.threshold, selection.last_tie[l], selection.dropped_ties[l] != 0,
                                    selection.kept_sum[l] / static_cast<double>(count)};
      write_effective(sp[l], wp[l], layer_out.mutable_data_ptr<scalar_t>(), sizes[l], own);
      out.push_back(layer_out);
      counts[l] = count;
    }
  });
  return {out, counts};
}

}  // namespace

TORCH_LIBRARY(biprop_masks, m) {
  m.def("effective_weight(Tensor scores, Tensor weight, int n_keep) -> Tensor");
  m.def("score_gradient(Tensor grad, Tensor scores, Tensor weight) -> Tensor");
  m.def("global_kept_counts(Tensor[] scores, int n_keep) -> int[]");
  m.def("global_effective_weights(Tensor[] scores, Tensor[] weights, int n_keep) -> (Tensor[], int[])");
}

TORCH_LIBRARY_IMPL(biprop_masks, CPU, m) {
  m.impl("effective_weight", &effective_weight);
  m.impl("score_gradient", &score_gradient);
  m.impl("global_kept_counts", &global_kept_counts);
  m.impl("global_effective_weights", &global_effective_weights);
}
