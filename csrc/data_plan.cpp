// pybind11 module phoenix.data._plan_cpp: the tight loops of the data plan builder.
// Python (phoenix/data/plan.py) validates inputs and turns weights into exact integer
// quotas; everything here is integer arithmetic so results are bit-identical to
// phoenix/testing/plan_reference.py on every platform and for any thread count.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <numeric>
#include <mutex>
#include <thread>

#include "data_plan.h"

namespace py = pybind11;
using namespace phoenix_plan;

namespace phoenix_plan {

namespace {

void split_kinds(const std::vector<int>& kind, const std::vector<u64>& quota,
                 const std::vector<i64>& burst_size, std::vector<Burst>* bursts,
                 std::vector<int>* blended) {
  for (int d = 0; d < static_cast<int>(kind.size()); ++d) {
    if (kind[d] == 1) bursts->push_back({d, quota[d], burst_size[d]});
    else if (kind[d] == 0 && quota[d] > 0) blended->push_back(d);
  }
}

void fill_bursts(const std::vector<Burst>& bursts, i64 t, int32_t* row) {
  for (const auto& b : bursts) row[b.dataset] = static_cast<int32_t>(b.size * burst_on(b.rate, t));
}

// Pfair lag check after a batch: advance E by `add`/kQ and test -1 < x - E < 1.
bool lag_ok(i64 x, i64* level, u64* rem, u64 add) {
  *rem += add;
  if (*rem >= kQ) *rem -= kQ, ++*level;
  return x == *level || (x == *level + 1 && *rem > 0);
}

// PD^2 on the fractional parts of the per-batch targets (see plan.py, step 2).
Allocation allocate_pd2(const Slots& slots, const std::vector<int>& blended,
                        const std::vector<u64>& quota, int D, i64 batch_size,
                        i64 num_batches, i64 horizon) {
  const std::vector<Burst>& bursts = *slots.bursts;
  const size_t nb = blended.size();
  std::vector<Fluid> fluid;
  std::vector<char> heavy(nb);
  std::vector<i64> extras(nb, 0), level(nb, 0), base(nb);
  std::vector<u64> rem(nb, 0), phi(nb);
  for (size_t i = 0; i < nb; ++i) {
    const u64 q = quota[blended[i]];
    fluid.emplace_back(q, &slots);
    // PD^2 "heavy" task: extras weight (at full capacity) >= 1/2.
    heavy[i] = 2 * static_cast<u128>((static_cast<u128>(q) * static_cast<u64>(batch_size)) & kQMask) >= kQ;
  }
  struct Cand {
    i64 dl;
    int nb;  // -b
    i64 ng;  // -group deadline
    size_t i;
    bool operator<(const Cand& o) const {
      if (dl != o.dl) return dl < o.dl;
      if (nb != o.nb) return nb < o.nb;
      if (ng != o.ng) return ng < o.ng;
      return i < o.i;  // blended[] is sorted, so this is the dataset index
    }
  };
  Allocation out;
  out.counts.assign(static_cast<size_t>(num_batches) * D, 0);
  std::vector<Cand> cands;
  std::vector<char> chosen(nb);
  for (i64 t = 0; t < num_batches; ++t) {
    int32_t* row = out.counts.data() + static_cast<size_t>(t) * D;
    const i64 ft = slots.at(t);
    fill_bursts(bursts, t, row);
    i64 need = ft;
    for (size_t i = 0; i < nb; ++i) {
      const u128 prod = static_cast<u128>(quota[blended[i]]) * static_cast<u64>(ft);
      base[i] = static_cast<i64>(prod >> kQBits);
      phi[i] = static_cast<u64>(prod & kQMask);
      need -= base[i];
    }
    cands.clear();
    for (size_t i = 0; i < nb; ++i) {
      i64 dl, gd;
      int b;
      if (fluid[i].key(extras[i] + 1, t, horizon, heavy[i], &dl, &b, &gd)) cands.push_back({dl, -b, -gd, i});
    }
    std::sort(cands.begin(), cands.end());
    std::fill(chosen.begin(), chosen.end(), 0);
    i64 got = 0;
    for (size_t c = 0; c < cands.size() && got < need; ++c, ++got) chosen[cands[c].i] = 1;
    if (got < need) {  // PD^2 ran out of released subtasks
      ++out.violations;
      for (size_t i = 0; i < nb && got < need; ++i)
        if (!chosen[i]) chosen[i] = 1, ++got;
    }
    for (size_t i = 0; i < nb; ++i) {
      extras[i] += chosen[i];
      row[blended[i]] = static_cast<int32_t>(base[i] + chosen[i]);
      if (!lag_ok(extras[i], &level[i], &rem[i], phi[i])) ++out.violations;
    }
  }
  return out;
}

// sum_{m<u} F_m in closed form (the flexible datasets' share through prefix sums).
u128 cum_free(const Slots& slots, i64 u) {
  u128 s = static_cast<u128>(slots.batch_size) * static_cast<u64>(u);
  for (const auto& b : *slots.bursts)
    s -= static_cast<u128>(b.size) * ((static_cast<u128>(kQ / 2) + static_cast<u128>(u) * b.rate) >> kQBits);
  if (!slots.taken.empty())
    s -= static_cast<u128>(slots.taken_cum[std::min<i64>(u, static_cast<i64>(slots.taken.size()))]);
  return s;
}

// Fallback: cumulative EDF over unit jobs. Sample j of dataset d is released in the batch
// where its total fluid T_d first exceeds j-1 and due in the batch where it reaches j;
// filling each batch with the earliest-due released samples meets every deadline (EDF is
// optimal for unit jobs; the fluid schedule shows a feasible assignment exists), so
// floor(T_d) <= count <= ceil(T_d) after every batch. Per-batch counts may then differ by
// up to 2 from the per-batch target instead of 1.
Allocation allocate_edf(const Slots& slots, const std::vector<int>& blended,
                        const std::vector<u64>& quota, int D, i64 num_batches) {
  const std::vector<Burst>& bursts = *slots.bursts;
  const size_t nb = blended.size();
  auto reached = [&](size_t i, i64 u, i64 j) {  // T_d(u) >= j
    return static_cast<u128>(quota[blended[i]]) * cum_free(slots, u) >=
           static_cast<u128>(j) << kQBits;
  };
  auto deadline = [&](size_t i, i64 j, i64 lo) {  // min u > lo with T_d(u) >= j
    i64 step = 1;
    while (!reached(i, lo + step, j)) lo += step, step *= 2;
    i64 hi = lo + step;
    while (hi - lo > 1) {
      const i64 mid = lo + (hi - lo) / 2;
      if (reached(i, mid, j)) hi = mid;
      else lo = mid;
    }
    return hi;
  };
  Allocation out;
  out.counts.assign(static_cast<size_t>(num_batches) * D, 0);
  std::vector<i64> taken(nb, 0), floor_(nb);
  std::vector<char> frac(nb), chosen(nb);
  std::vector<std::pair<i64, size_t>> cands;
  for (i64 t = 0; t < num_batches; ++t) {
    int32_t* row = out.counts.data() + static_cast<size_t>(t) * D;
    fill_bursts(bursts, t, row);
    const u128 total = cum_free(slots, t + 1);
    i64 need = slots.at(t);
    cands.clear();
    for (size_t i = 0; i < nb; ++i) {
      const u128 prod = static_cast<u128>(quota[blended[i]]) * total;
      floor_[i] = static_cast<i64>(prod >> kQBits);
      frac[i] = (prod & kQMask) != 0;
      const i64 must = std::max<i64>(0, floor_[i] - taken[i]);
      need -= must;
      row[blended[i]] = static_cast<int32_t>(must);
      if (frac[i] && taken[i] + must == floor_[i]) cands.push_back({deadline(i, floor_[i] + 1, t + 1), i});
    }
    std::sort(cands.begin(), cands.end());
    std::fill(chosen.begin(), chosen.end(), 0);
    i64 got = 0;
    for (size_t c = 0; c < cands.size() && got < need; ++c, ++got) chosen[cands[c].second] = 1;
    if (need < 0 || got < need) ++out.violations;
    for (size_t i = 0; i < nb; ++i) {
      row[blended[i]] += chosen[i];
      taken[i] += row[blended[i]];
      if (!(taken[i] == floor_[i] || (taken[i] == floor_[i] + 1 && frac[i]))) ++out.violations;
    }
  }
  return out;
}

}  // namespace

Allocation allocate(const std::vector<int>& kind, const std::vector<u64>& quota,
                    const std::vector<i64>& burst_size, i64 batch_size, i64 num_batches,
                    i64 horizon, const std::vector<i64>& taken) {
  std::vector<Burst> bursts;
  std::vector<int> blended;
  split_kinds(kind, quota, burst_size, &bursts, &blended);
  const int D = static_cast<int>(kind.size());
  Slots slots{&bursts, batch_size, taken, std::vector<i64>(taken.size() + 1, 0)};
  for (size_t u = 0; u < taken.size(); ++u) slots.taken_cum[u + 1] = slots.taken_cum[u] + taken[u];
  Allocation out = allocate_pd2(slots, blended, quota, D, batch_size, num_batches, horizon);
  if (out.violations == 0) return out;
  out = allocate_edf(slots, blended, quota, D, num_batches);
  out.edf = true;
  return out;
}

}  // namespace phoenix_plan

namespace {

// Output position of the j-th source sample of a batch. B = 2^a * m (m odd): the low a
// bits of j are bit-reversed (so consecutive sources land in different halves, quarters,
// ... of the batch) and complemented for odd j (so sources 2i and 2i+1 differ in every
// bit: on different ranks for any power-of-two micro-batch layout); the high part is
// scattered by a stride coprime to m.
std::vector<i64> interleave_positions(i64 B, bool interleave) {
  std::vector<i64> pos(B);
  if (!interleave) {
    for (i64 j = 0; j < B; ++j) pos[j] = j;
    return pos;
  }
  int a = __builtin_ctzll(static_cast<u64>(B));
  i64 m = B >> a;
  i64 s = (m * 5) / 8;
  while (std::gcd(s, m) != 1) ++s;
  for (i64 j = 0; j < B; ++j) {
    i64 low = j & ((1ll << a) - 1), high = j >> a, rev = 0;
    for (int k = 0; k < a; ++k) rev |= ((low >> k) & 1) << (a - 1 - k);
    if (low & 1) rev ^= (1ll << (a - 1)) - 1;
    pos[j] = rev * m + (high * s) % m;
  }
  return pos;
}

template <class T>
std::vector<T> to_vec(const py::array_t<T, py::array::c_style | py::array::forcecast>& a) {  // NOLINT
  return std::vector<T>(a.data(), a.data() + a.size());
}

// Writes the samples of dataset d in batch k to their interleaved output slots.
struct SlotWriter {
  uint16_t* ds;
  i64* ss;
  const i64* pos;
  i64 base;   // k * B
  i64 first;  // index of the dataset's first source sample in the batch
  i64 j = 0;
  uint16_t d;
  void operator()(i64 sample) {
    const i64 o = base + pos[first + j++];
    ds[o] = d;
    ss[o] = sample;
  }
  void reset() { j = 0; }
};

struct Inputs {
  std::vector<i64> n, start;
  std::vector<u64> keys;
  std::vector<const i64*> starts;
  std::vector<i64> num_groups;
  i64 B, K;
  u64 seed;
  int window;
  std::vector<int> kind;
  std::vector<u64> quota;
  std::vector<Burst> bursts;  // of the allocator's batches (after the K0 fixed ones)
  i64 K0 = 0;
};

struct Outputs {
  uint16_t* ds;
  i64* ss;
  std::vector<i64> end, epochs, split, total, fit, fit_split;
  i64 pending_left = 0;
  std::vector<std::vector<i64>> flex;  // samples of each flexible dataset, in order
};

// Fit limit of grouped dataset d in batch k: its count in a fixed (warmup) batch, else
// ceil of its share of the batch's free slots.
i64 batch_fit(const Inputs& in, const Allocation& al, int d, i64 k) {
  const int D = static_cast<int>(in.n.size());
  if (k < in.K0) return al.counts[static_cast<size_t>(k) * D + d];
  return fit_limit(in.quota[d], free_slots(in.bursts, in.B, k - in.K0));
}

// Flexible grouped datasets, in dataset order: each takes whole groups against its
// cumulative target from the slots the bursts and the flexible datasets before it left.
// Returns what they took per batch (the slots the allocator must not plan).
std::vector<i64> pack_flexible(const Inputs& in, std::vector<int32_t>* flex_counts, Outputs& out) {
  const int D = static_cast<int>(in.n.size());
  const i64 K = in.K;
  std::vector<i64> taken(static_cast<size_t>(K), 0);
  flex_counts->assign(static_cast<size_t>(K) * D, 0);
  for (int d = 0; d < D; ++d) {
    if (in.kind[d] != 2) continue;
    FlexPacker fp(in.n[d], in.starts[d], in.num_groups[d], in.seed, in.keys[d], in.start[d]);
    const u64 q = in.quota[d];
    out.flex[d].reserve(static_cast<size_t>((static_cast<u128>(q) * static_cast<u64>(in.B * K)) >> kQBits) + 64);
    u128 cum = 0;
    for (i64 k = 0; k < K; ++k) {
      const i64 f = free_slots(in.bursts, in.B, k);
      cum += static_cast<u128>(f);
      const bool force = static_cast<u128>(q) * static_cast<u64>(f) >= static_cast<u128>(kQ);
      const i64 c = fp.batch(static_cast<u128>(q) * cum, f - taken[k], fit_limit(q, f), force, out.flex[d]);
      (*flex_counts)[static_cast<size_t>(k) * D + d] = static_cast<int32_t>(c);
      taken[k] += c;
    }
    out.end[d] = fp.end_offset();
    out.epochs[d] = fp.epochs_touched();
    out.split[d] = fp.groups_split();
    out.total[d] = fp.groups_total();
    out.fit[d] = fp.groups_fit();
  }
  return taken;
}

void fill_plain(const Inputs& in, const Allocation& al, const std::vector<i64>& cum,
                const std::vector<int32_t>& first, const std::vector<i64>& pos, int d, i64 k0,
                i64 k1, Outputs& out) {
  const int D = static_cast<int>(in.n.size());
  const i64 n = in.n[d];
  i64 p = in.start[d] + cum[static_cast<size_t>(k0) * D + d];
  i64 epoch = p / n;
  p %= n;
  Permutation fe(n, epoch_key(in.seed, in.keys[d], static_cast<u64>(epoch)));
  i64 hi = p / fe.radix(), lo = p % fe.radix();  // p as (p / b, p % b), advanced without division
  for (i64 k = k0; k < k1; ++k) {
    const i64 c = al.counts[static_cast<size_t>(k) * D + d];
    const i64* slot = pos.data() + first[static_cast<size_t>(k) * D + d];
    uint16_t* ds = out.ds + k * in.B;
    i64* ss = out.ss + k * in.B;
    for (i64 j = 0; j < c; ++j) {
      if (p == n) {  // next epoch: fresh permutation
        fe = Permutation(n, epoch_key(in.seed, in.keys[d], static_cast<u64>(++epoch)));
        p = hi = lo = 0;
      }
      ds[slot[j]] = static_cast<uint16_t>(d);
      ss[slot[j]] = fe.at(hi, lo);
      ++p;
      if (++lo == fe.radix()) lo = 0, ++hi;
    }
  }
}

void fill_grouped(const Inputs& in, const Allocation& al, const std::vector<int32_t>& first,
                  const std::vector<i64>& pos, int d, i64 total, Outputs& out,
                  std::mutex& mu) {
  const int D = static_cast<int>(in.n.size());
  GroupPacker gp(in.n[d], in.starts[d], in.num_groups[d], in.seed, in.keys[d], in.start[d], in.window);
  i64 remaining = total;
  for (i64 k = 0; k < in.K; ++k) {
    const i64 c = al.counts[static_cast<size_t>(k) * D + d];
    remaining -= c;
    SlotWriter w{out.ds, out.ss, pos.data(), k * in.B, first[static_cast<size_t>(k) * D + d], 0,
                 static_cast<uint16_t>(d)};
    gp.set_fit(batch_fit(in, al, d, k));
    gp.batch(c, remaining, w);
  }
  out.end[d] = gp.end_offset();
  out.epochs[d] = gp.epochs_touched();
  out.split[d] = gp.groups_split();
  out.total[d] = gp.groups_total();
  out.fit[d] = gp.groups_fit();
  out.fit_split[d] = gp.groups_fit_split();
  if (!gp.pending_empty()) {
    std::lock_guard<std::mutex> lock(mu);
    ++out.pending_left;
  }
}

// Writes a flexible dataset's samples (already chosen) to their slots.
void fill_flex(const Inputs& in, const Allocation& al, const std::vector<int32_t>& first,
               const std::vector<i64>& pos, int d, Outputs& out) {
  const int D = static_cast<int>(in.n.size());
  const i64* src = out.flex[d].data();
  for (i64 k = 0; k < in.K; ++k) {
    const i64 c = al.counts[static_cast<size_t>(k) * D + d];
    const i64* slot = pos.data() + first[static_cast<size_t>(k) * D + d];
    for (i64 j = 0; j < c; ++j) {
      out.ds[k * in.B + slot[j]] = static_cast<uint16_t>(d);
      out.ss[k * in.B + slot[j]] = *src++;
    }
  }
}

// first[k][d]: index of dataset d's first source sample in batch k (datasets in order);
// cum[k][d]: samples of d before batch k (k = 0..K); total[d] = cum[K][d].
struct Layout {
  std::vector<int32_t> first;
  std::vector<i64> cum, total;
};

Layout layout(const Allocation& al, i64 K, int D) {
  Layout l{std::vector<int32_t>(static_cast<size_t>(K) * D),
           std::vector<i64>(static_cast<size_t>(K + 1) * D, 0), std::vector<i64>(D)};
  for (i64 k = 0; k < K; ++k) {
    int32_t acc = 0;
    for (int d = 0; d < D; ++d) {
      const size_t idx = static_cast<size_t>(k) * D + d;
      l.first[idx] = acc;
      acc += al.counts[idx];
      l.cum[idx + D] = l.cum[idx] + al.counts[idx];
    }
  }
  for (int d = 0; d < D; ++d) l.total[d] = l.cum[static_cast<size_t>(K) * D + d];
  return l;
}

// Runs the tasks on `threads` threads (the caller's included); rethrows the first error.
void run_parallel(const std::vector<std::function<void()>>& tasks, int threads, std::mutex& mu) {
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  auto worker = [&] {
    for (size_t t; (t = next++) < tasks.size();) {
      try {
        tasks[t]();
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < std::min<int>(threads, static_cast<int>(tasks.size())); ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

// Writes every planned sample. Grouped datasets carry packing state from batch to batch,
// so each is one task; ungrouped ones are split into batch ranges (their stream position
// at any batch is known from the counts). Tasks write disjoint output slots.
void fill(const Inputs& in, const Allocation& al, const std::vector<i64>& pos, int threads,
          Outputs& out) {
  const int D = static_cast<int>(in.n.size());
  const Layout l = layout(al, in.K, D);
  std::vector<std::function<void()>> tasks;
  std::mutex mu;
  std::vector<int> plain;
  for (int d = 0; d < D; ++d) {
    if (in.kind[d] == 2) {
      if (l.total[d] > 0) tasks.push_back([&, d] { fill_flex(in, al, l.first, pos, d, out); });
    } else if (l.total[d] == 0) {
      out.end[d] = in.start[d];
    } else if (in.starts[d]) {
      tasks.push_back([&, d] { fill_grouped(in, al, l.first, pos, d, l.total[d], out, mu); });
    } else {
      plain.push_back(d);
      out.end[d] = in.start[d] + l.total[d];
      out.epochs[d] = (in.start[d] + l.total[d] - 1) / in.n[d] - in.start[d] / in.n[d] + 1;
    }
  }
  const i64 chunks = plain.empty() ? 0 : std::max<i64>(1, std::min<i64>(in.K, 4 * threads));
  for (i64 c = 0; c < chunks; ++c) {
    const i64 k0 = in.K * c / chunks, k1 = in.K * (c + 1) / chunks;
    tasks.push_back([&, k0, k1] {
      for (int d : plain) fill_plain(in, al, l.cum, l.first, pos, d, k0, k1, out);
    });
  }
  run_parallel(tasks, threads, mu);
}

using I64Array = py::array_t<i64, py::array::c_style | py::array::forcecast>;

// Copies the per-dataset inputs; `keep` holds the group-start arrays alive.
Inputs parse_inputs(const I64Array& num_samples,
                    const py::array_t<u64, py::array::c_style | py::array::forcecast>& keys,
                    const I64Array& start, const py::list& group_starts, i64 B, i64 K, u64 seed,
                    int window, std::vector<I64Array>* keep) {
  Inputs in;
  in.n = to_vec(num_samples);
  in.keys = to_vec(keys);
  in.start = to_vec(start);
  in.B = B, in.K = K, in.seed = seed, in.window = window;
  for (size_t d = 0; d < in.n.size(); ++d) {
    if (group_starts[d].is_none()) {
      in.starts.push_back(nullptr);
      in.num_groups.push_back(0);
      continue;
    }
    keep->push_back(group_starts[d].cast<I64Array>());
    in.starts.push_back(keep->back().data());
    in.num_groups.push_back(keep->back().size() - 1);
  }
  return in;
}

py::array_t<i64> to_array(const std::vector<i64>& v) {
  py::array_t<i64> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

py::dict build(const I64Array& num_samples,
               const py::array_t<u64, py::array::c_style | py::array::forcecast>& keys,
               const I64Array& kind, const I64Array& quota, const I64Array& burst_size,
               const I64Array& start, const py::list& group_starts, i64 B, i64 K, u64 seed,
               bool interleave, i64 horizon, int window, int threads,
               const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& fixed_counts) {
  const py::ssize_t D = num_samples.size();
  // fixed_counts: the first K0 batches' counts given by the caller (a mixture warmup);
  // the allocator fills the remaining K - K0 batches from the quotas.
  const i64 K0 = fixed_counts.ndim() == 2 ? fixed_counts.shape(0) : -1;
  if (K0 < 0 || K0 > K || (K0 > 0 && fixed_counts.shape(1) != D))
    throw std::invalid_argument("_plan_cpp.build: fixed_counts must have shape (K0 <= K, D)");
  if (B < 1 || K < 0 || D < 1 || D > 65535 || window < 1 || horizon < 1 ||
      static_cast<py::ssize_t>(group_starts.size()) != D || kind.size() != D ||
      quota.size() != D || burst_size.size() != D || start.size() != D || keys.size() != D)
    throw std::invalid_argument("_plan_cpp.build: inconsistent arguments");
  std::vector<I64Array> keep;
  Inputs in = parse_inputs(num_samples, keys, start, group_starts, B, K, seed, window, &keep);
  std::vector<int> kind_v(kind.data(), kind.data() + D);
  std::vector<u64> quota_v(quota.data(), quota.data() + D);
  std::vector<i64> burst_v = to_vec(burst_size);
  std::vector<int> blended_unused;
  split_kinds(kind_v, quota_v, burst_v, &in.bursts, &blended_unused);
  in.kind = kind_v, in.quota = quota_v, in.K0 = K0;
  bool has_flex = false;
  for (py::ssize_t d = 0; d < D; ++d) {
    if (kind_v[d] == 2 && (K0 > 0 || !in.starts[d]))
      throw std::invalid_argument("_plan_cpp.build: a flexible grouped dataset needs group starts and no fixed_counts");
    has_flex |= kind_v[d] == 2;
  }

  py::array_t<uint16_t> ds_arr(K * B);
  py::array_t<i64> ss_arr(K * B);
  Outputs out{ds_arr.mutable_data(), ss_arr.mutable_data(), std::vector<i64>(D, 0),
              std::vector<i64>(D, 0), std::vector<i64>(D, 0), std::vector<i64>(D, 0),
              std::vector<i64>(D, 0), std::vector<i64>(D, 0), 0,
              std::vector<std::vector<i64>>(D)};
  Allocation al;
  double alloc_s = 0, fill_s = 0;
  {
    py::gil_scoped_release nogil;
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    std::vector<int32_t> flex_counts;
    const std::vector<i64> taken = has_flex ? pack_flexible(in, &flex_counts, out) : std::vector<i64>();
    al = allocate(kind_v, quota_v, burst_v, B, K - K0, horizon, taken);
    if (has_flex)
      for (size_t i = 0; i < al.counts.size(); ++i) al.counts[i] += flex_counts[i];
    al.counts.insert(al.counts.begin(), fixed_counts.data(), fixed_counts.data() + K0 * D);
    const auto t1 = clock::now();
    fill(in, al, interleave_positions(B, interleave), std::max(1, threads), out);
    alloc_s = std::chrono::duration<double>(t1 - t0).count();
    fill_s = std::chrono::duration<double>(clock::now() - t1).count();
  }
  py::array_t<int32_t> counts_arr(std::vector<py::ssize_t>{K, D});
  std::copy(al.counts.begin(), al.counts.end(), counts_arr.mutable_data());
  py::dict res;
  res["dataset_ids"] = ds_arr;
  res["sample_ids"] = ss_arr;
  res["counts"] = counts_arr;
  res["end_offsets"] = to_array(out.end);
  res["epochs"] = to_array(out.epochs);
  res["groups_split"] = to_array(out.split);
  res["groups_total"] = to_array(out.total);
  res["groups_fit"] = to_array(out.fit);
  res["groups_fit_split"] = to_array(out.fit_split);
  res["violations"] = al.violations;
  res["allocator"] = al.edf ? "edf" : "pd2";
  res["pending_left"] = out.pending_left;
  res["allocate_s"] = alloc_s;
  res["fill_s"] = fill_s;
  return res;
}

py::array_t<i64> permutation(i64 n, u64 seed, u64 key, u64 epoch,
                             py::array_t<i64, py::array::c_style | py::array::forcecast> x) {
  if (n < 1) throw std::invalid_argument("permutation: n must be >= 1");
  Permutation fe(n, epoch_key(seed, key, epoch));
  py::array_t<i64> out(x.size());
  const i64* src = x.data();
  i64* dst = out.mutable_data();
  for (py::ssize_t i = 0; i < x.size(); ++i) {
    if (src[i] < 0 || src[i] >= n) throw std::out_of_range("permutation: position out of range");
    dst[i] = fe(src[i]);
  }
  return out;
}

// Start of every run of equal ids plus len(ids), and whether the run ids increase.
template <class T>
py::tuple group_starts(py::array_t<T, py::array::c_style> ids) {
  const T* p = ids.data();
  const i64 n = ids.size();
  std::vector<i64> st;
  bool increasing = true;
  {
    py::gil_scoped_release nogil;
    st.reserve(static_cast<size_t>(n / 8 + 2));
    if (n) st.push_back(0);
    for (i64 i = 1; i < n; ++i) {
      if (p[i] != p[i - 1]) {
        increasing &= p[i] > p[i - 1];
        st.push_back(i);
      }
    }
    st.push_back(n);
  }
  py::array_t<i64> out(static_cast<py::ssize_t>(st.size()));
  std::copy(st.begin(), st.end(), out.mutable_data());
  return py::make_tuple(out, increasing);
}

// Group packing of a grouped dataset (phoenix.data.samples, "pack_groups"): split the
// sequence of groups (token counts `tokens`, in the order given) into units of
// consecutive groups, each cut as one stream into samples of seq_length (+1) tokens,
// minimising the total number of samples (so the padding of the units' last samples).
// A unit of >= 2 groups holds at most `max_samples` samples and `max_groups` groups; a
// single group may be any size. Exact dynamic programme over the unit's last group,
// O(G * max_groups); ties prefer the shorter last unit. Returns the G_units + 1 unit
// boundaries as positions in the group sequence.
py::array_t<i64> pack_units(py::array_t<i64, py::array::c_style | py::array::forcecast> tokens,
                            i64 seq_length, i64 max_samples, i64 max_groups) {
  if (seq_length < 1 || max_samples < 1 || max_groups < 1)
    throw std::invalid_argument("pack_units: seq_length, max_samples and max_groups must be >= 1");
  const i64 G = tokens.size();
  const i64* t = tokens.data();
  std::vector<i64> bounds;
  {
    py::gil_scoped_release nogil;
    std::vector<i64> cs(G + 1, 0), f(G + 1, 0), from(G + 1, 0);
    for (i64 g = 0; g < G; ++g) {
      if (t[g] < 0) throw std::invalid_argument("pack_units: negative token count");
      cs[g + 1] = cs[g] + t[g];
    }
    auto samples = [&](i64 i, i64 j) {  // as _cut: ceil((T - 1) / seq) for T >= 2 tokens
      const i64 T = cs[j] - cs[i];
      return T >= 2 ? (T - 2) / seq_length + 1 : 0;
    };
    for (i64 j = 1; j <= G; ++j) {
      i64 best = f[j - 1] + samples(j - 1, j), arg = j - 1;
      for (i64 i = j - 2; i >= 0 && j - i <= max_groups; --i) {
        const i64 n = samples(i, j);
        if (n > max_samples) break;  // grows with the span
        if (f[i] + n < best) best = f[i] + n, arg = i;
      }
      f[j] = best, from[j] = arg;
    }
    for (i64 j = G; j > 0; j = from[j]) bounds.push_back(j);
    bounds.push_back(0);
    std::reverse(bounds.begin(), bounds.end());
  }
  py::array_t<i64> out(static_cast<py::ssize_t>(bounds.size()));
  std::copy(bounds.begin(), bounds.end(), out.mutable_data());
  return out;
}

}  // namespace

PYBIND11_MODULE(_plan_cpp, m) {
  m.doc() = "Phoenix data plan builder (C++ core); use phoenix.data.plan, not this module.";
  m.attr("Q_BITS") = kQBits;
  m.def("build", &build, "Build a plan from prepared integer inputs (see phoenix.data.plan.prepare).",
        py::arg("num_samples"), py::arg("keys"), py::arg("kind"), py::arg("quota"),
        py::arg("burst_size"), py::arg("start"), py::arg("group_starts"),
        py::arg("global_batch_size"), py::arg("num_batches"), py::arg("seed"),
        py::arg("interleave"), py::arg("horizon"), py::arg("window"), py::arg("threads"),
        py::arg("fixed_counts") = py::array_t<int32_t>(std::vector<py::ssize_t>{0, 0}));
  m.def("group_starts", &group_starts<int64_t>, py::arg("ids"));
  m.def("group_starts", &group_starts<int32_t>, py::arg("ids"));
  m.def("pack_units", &pack_units, "Unit boundaries of group packing, pack_groups (see phoenix.data.samples).",
        py::arg("tokens"), py::arg("seq_length"), py::arg("max_samples"), py::arg("max_groups"));
  m.def("permutation", &permutation, "Epoch permutation of range(n) at positions x.",
        py::arg("n"), py::arg("seed"), py::arg("key"), py::arg("epoch"), py::arg("x"));
  m.def(
      "interleave_positions",
      [](i64 B, bool interleave) {
        std::vector<i64> v = interleave_positions(B, interleave);
        py::array_t<i64> a(B);
        std::copy(v.begin(), v.end(), a.mutable_data());
        return a;
      },
      py::arg("global_batch_size"), py::arg("interleave"));
}
