// Core of Phoenix's group-aware blended data plan (see phoenix/data/plan.py for the
// specification; phoenix/testing/plan_reference.py is the executable reference that this
// code must match bit for bit).
//
// Three independent parts, all exact integer arithmetic:
//   * Feistel      - the per-epoch sample (or group) permutation, O(1) random access.
//   * allocate()   - per-batch counts c[k][d]: Bresenham bursts + PD^2 (Pfair) rounding.
//   * FlexPacker   - whole-group consumption of a grouped dataset whose per-batch count
//                    follows its groups (the other datasets fill the slots it leaves).
//   * GroupPacker  - whole-group consumption of a grouped dataset into exact counts
//                    (stages with no dataset to absorb the deviation, or a mixture warmup).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <stdexcept>
#include <vector>

namespace phoenix_plan {

using i64 = int64_t;
using u64 = uint64_t;
using u128 = unsigned __int128;

constexpr int kQBits = 60;
constexpr u64 kQ = 1ull << kQBits;  // fixed-point unit of quotas: weight 1.0 == kQ
constexpr u64 kQMask = kQ - 1;
constexpr i64 kInf = 1ll << 62;     // "deadline beyond the horizon"

// ---------------------------------------------------------------------------- PRNG
inline u64 mix64(u64 z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct SplitMix64 {
  u64 state;
  u64 next() { return mix64(state += 0x9E3779B97F4A7C15ull); }
};

inline u64 epoch_key(u64 seed, u64 key, u64 epoch) {
  return mix64(mix64(mix64(seed) ^ key) ^ epoch);
}

inline int bit_length(u64 v) { return v ? 64 - __builtin_clzll(v) : 0; }

inline i64 isqrt(i64 v) {  // floor(sqrt(v)), exact
  i64 r = static_cast<i64>(std::sqrt(static_cast<long double>(v)));
  while (r > 0 && r * r > v) --r;
  while ((r + 1) * (r + 1) <= v) ++r;
  return r;
}

// Random permutation of [0, n): a 4-round Feistel network on the mixed-radix domain
// [0, a) x [0, b) (a = ceil(sqrt(n)), b = ceil(n / a), so a*b - n < a) with modular
// addition and splitmix64-filled round tables, plus cycle walking for the < 1/b of the
// domain beyond n. Why not Fisher-Yates: this needs O(sqrt(n)) memory instead of O(n),
// gives O(1) random access (a stage can start anywhere in an epoch), and consecutive
// positions need no division; with random round tables a 4-round Feistel is a strong
// pseudo-random permutation (Luby-Rackoff).
class Feistel {
 public:
  Feistel() = default;
  Feistel(i64 n, u64 key) : n_(n), a_(isqrt(n - 1) + 1), b_((n + a_ - 1) / a_) {
    SplitMix64 rng{key};
    for (int r = 0; r < 4; ++r) {  // even rounds: b entries in [0, a); odd: a entries in [0, b)
      const i64 size = (r % 2 == 0) ? b_ : a_, mod = (r % 2 == 0) ? a_ : b_;
      tab_[r].resize(size);
      for (auto& v : tab_[r]) v = static_cast<uint32_t>((static_cast<u128>(rng.next()) * static_cast<u64>(mod)) >> 64);
    }
  }
  i64 n() const { return n_; }
  i64 radix() const { return b_; }  // position x is the pair (x / b, x % b)
  // Image of the position (hi, lo) = (x / b, x % b), x < n.
  i64 at(i64 hi, i64 lo) const {
    i64 y = once(hi, lo);
    while (y >= n_) y = once(y / b_, y % b_);
    return y;
  }
  i64 operator()(i64 x) const { return at(x / b_, x % b_); }

 private:
  i64 once(i64 l, i64 r) const {
    l += tab_[0][r], l -= (l >= a_) ? a_ : 0;
    r += tab_[1][l], r -= (r >= b_) ? b_ : 0;
    l += tab_[2][r], l -= (l >= a_) ? a_ : 0;
    r += tab_[3][l], r -= (r >= b_) ? b_ : 0;
    return l * b_ + r;
  }
  i64 n_ = 1, a_ = 1, b_ = 1;
  std::vector<uint32_t> tab_[4];
};

// The epoch permutation: Fisher-Yates (splitmix64, multiply-shift bounded draws) up to
// kSmallPerm elements, where a Feistel network on a tiny domain is far from uniform and
// materialising is cheap; the Feistel network above beyond.
constexpr i64 kSmallPerm = 1 << 16;

class Permutation {
 public:
  Permutation() = default;
  Permutation(i64 n, u64 key) : n_(n) {
    if (n > kSmallPerm) {
      fe_ = Feistel(n, key);
      return;
    }
    small_.resize(n);
    for (i64 i = 0; i < n; ++i) small_[i] = i;
    SplitMix64 rng{key};
    for (i64 i = n - 1; i > 0; --i) {
      const i64 j = static_cast<i64>((static_cast<u128>(rng.next()) * static_cast<u64>(i + 1)) >> 64);
      std::swap(small_[i], small_[j]);
    }
  }
  i64 radix() const { return small_.empty() ? fe_.radix() : n_; }
  i64 at(i64 hi, i64 lo) const { return small_.empty() ? fe_.at(hi, lo) : small_[lo]; }
  i64 operator()(i64 x) const { return small_.empty() ? fe_(x) : small_[x]; }

 private:
  i64 n_ = 1;
  Feistel fe_;
  std::vector<i64> small_;
};

// ---------------------------------------------------------------------- allocation
struct Burst {
  int dataset;
  u64 rate;   // fraction of batches in which it appears, times kQ
  i64 size;   // samples per appearance
};

// 1 if a burst with rate p/kQ appears in batch u (Bresenham with phase 1/2).
inline i64 burst_on(u64 p, i64 u) {
  u128 a = static_cast<u128>(kQ / 2) + static_cast<u128>(u) * p;
  return static_cast<i64>(((a + p) >> kQBits) - (a >> kQBits));
}

inline i64 free_slots(const std::vector<Burst>& bursts, i64 batch_size, i64 u) {
  i64 f = batch_size;
  for (const auto& b : bursts) f -= b.size * burst_on(b.rate, u);
  return f;
}

// Slots of batch u left to the blended datasets the allocator plans: B minus the bursts
// minus what the flexible grouped datasets took (`taken`, known for u < K; beyond the
// stage only the bursts count, which only shapes deadlines past its end).
struct Slots {
  const std::vector<Burst>* bursts;
  i64 batch_size;
  std::vector<i64> taken;      // per batch (empty: none)
  std::vector<i64> taken_cum;  // prefix sums of taken, size taken.size() + 1
  i64 at(i64 u) const {
    i64 f = free_slots(*bursts, batch_size, u);
    if (u < static_cast<i64>(taken.size())) f -= taken[u];
    return f;
  }
};

// Extras fluid of one blended dataset: E(u) = sum_{m<u} frac(q * F_m / kQ), scanned
// forward lazily. Subtask j (its j-th extra sample) is released at
// r_j = min{u : E(u+1) > j-1} and due before d_j = min{u : E(u) >= j};
// b_j = [E(d_j) > j] is PD^2's successor bit.
class Fluid {
 public:
  Fluid(u64 q, const Slots* slots) : q_(q), slots_(slots) {}

  // PD^2 key of subtask i at batch t; false if the subtask is not released yet.
  bool key(i64 i, i64 t, i64 horizon, bool heavy, i64* dl, int* b, i64* gd) {
    drop_before(i);
    while (!known_rel(i) && u_ <= t) step();
    if (!known_rel(i) || rec(i).rel > t) return false;
    while (!known_dl(i) && u_ <= t + horizon) step();
    if (!known_dl(i)) {
      *dl = kInf, *b = 0, *gd = 0;
      return true;
    }
    *dl = rec(i).dl;
    *b = rec(i).bbit ? 1 : 0;
    *gd = (*b && heavy) ? group_deadline(i, t, horizon) : 0;
    return true;
  }

 private:
  struct Rec {
    i64 rel = -1, dl = -1;
    bool bbit = false;
  };
  bool known_rel(i64 j) const { return j >= first_ && j - first_ < (i64)recs_.size() && recs_[j - first_].rel >= 0; }
  bool known_dl(i64 j) const { return j >= first_ && j - first_ < (i64)recs_.size() && recs_[j - first_].dl >= 0; }
  Rec& rec(i64 j) {
    while ((i64)recs_.size() <= j - first_) recs_.emplace_back();
    return recs_[j - first_];
  }
  void drop_before(i64 i) {  // records of subtasks already allocated are never read again
    while (first_ < i && !recs_.empty()) recs_.pop_front(), ++first_;
    if (recs_.empty()) first_ = std::max(first_, i);
  }
  void step() {
    u64 phi = static_cast<u64>((static_cast<u128>(q_) *
                                static_cast<u64>(slots_->at(u_))) & kQMask);
    u64 rem = rem_ + phi;  // < 2^61, no overflow
    if (rem >= kQ) {
      rem -= kQ;
      ++level_;
      if (level_ >= first_) {
        rec(level_).dl = u_ + 1;
        rec(level_).bbit = rem > 0;
      }
      if (rem > 0 && level_ + 1 >= first_) rec(level_ + 1).rel = u_;
    } else if (rem_ == 0 && rem > 0 && level_ + 1 >= first_) {
      rec(level_ + 1).rel = u_;
    }
    rem_ = rem;
    ++u_;
  }
  // First j > i ending the cascade of length-2 overlapping windows (PD^2 group deadline;
  // equals the closed form ceil((d_i - i) / (1 - w)) for a constant weight w >= 1/2).
  i64 group_deadline(i64 i, i64 t, i64 horizon) {
    if (gd_for_ != i) gd_for_ = i, gd_next_ = i + 1, gd_val_ = -1;
    if (gd_val_ >= 0) return gd_val_;
    for (i64 j = gd_next_;; ++j) {
      while (!known_dl(j) && u_ <= t + horizon) step();
      if (!known_dl(j)) {
        gd_next_ = j;
        return kInf;
      }
      const Rec& r = rec(j);
      if (r.dl - r.rel >= 3) return gd_val_ = r.dl - 1;
      if (!r.bbit) return gd_val_ = r.dl;
    }
  }

  u64 q_;
  const Slots* slots_;
  i64 u_ = 0, level_ = 0;
  u64 rem_ = 0;
  std::deque<Rec> recs_;
  i64 first_ = 1;  // recs_[j - first_] describes subtask j
  i64 gd_for_ = -1, gd_next_ = 0, gd_val_ = -1;
};

struct Allocation {
  std::vector<int32_t> counts;  // K x D, row-major
  i64 violations = 0;           // (batch, dataset) lag checks failed; 0 unless a bug
  bool edf = false;             // PD^2 failed (bursts only) and the EDF fallback was used
};

// Per-batch counts. kind[d]: 0 blended (quota = share of the slots left * kQ), 1 burst
// (quota = appearance rate * kQ, burst_size samples each time), 2 flexible grouped (not
// planned here: its per-batch counts come in `taken`, summed over such datasets). PD^2
// first; if its lag check fails anywhere (possible only when the slots vary), the whole
// allocation is redone with the cumulative-EDF fallback, whose lag bound is a theorem.
Allocation allocate(const std::vector<int>& kind, const std::vector<u64>& quota,
                    const std::vector<i64>& burst_size, i64 batch_size, i64 num_batches,
                    i64 horizon, const std::vector<i64>& taken = {});

// ceil(q * F / kQ) after removing the quota's rounding (|q - v kQ| <= 1): the fit limit of
// a dataset with share v = q / kQ of F slots, equal to ceil(v * F) unless v * F lies
// within 2F / kQ above an integer.
inline i64 fit_limit(u64 q, i64 f) {
  const u128 x = static_cast<u128>(q) * static_cast<u64>(f);
  const u128 y = x > static_cast<u128>(f) ? x - static_cast<u128>(f) : 0;
  return static_cast<i64>((y + kQ - 1) >> kQBits);
}

// ------------------------------------------------------------------- consumption
// Whole-group consumption of one grouped dataset. Positions are in the dataset's
// "stream": epoch * N + position within the epoch's group-shuffled sample sequence.
class GroupPacker {
 public:
  GroupPacker(i64 n, const i64* starts, i64 num_groups, u64 seed, u64 key, i64 start, int window);
  // Consume `count` samples for one batch; `emit(sample_id)` is called for each in order
  // and `emit.reset()` when a tentative placement is discarded (it is then redone).
  template <class Emit>
  void batch(i64 count, i64 remaining_after, Emit& emit);
  i64 end_offset() const;
  bool pending_empty() const { return st_.pending.empty(); }
  i64 groups_split() const { return st_.split; }
  i64 groups_total() const { return st_.total; }
  i64 groups_fit() const { return st_.fit_total; }
  i64 groups_fit_split() const { return st_.fit_split; }
  void set_fit(i64 fit) { fit_ = fit; }  // fit limit of the next batch (statistics only)
  i64 epochs_touched() const { return st_.first_touched < 0 ? 0 : st_.last_touched - st_.first_touched + 1; }

 private:
  struct Item {
    i64 group, size;
  };
  struct State {
    i64 epoch = 0, q = 0, pulled = 0;
    std::vector<Item> pending;
    bool has_partial = false;
    Item partial{0, 0};
    i64 done = 0;
    i64 split = 0, total = 0, first_touched = -1, last_touched = -1;
    i64 fit_total = 0, fit_split = 0;
  };
  template <class Emit> void emit_range(Emit& emit, i64 g, i64 lo, i64 hi);
  template <class Emit> void split_item(Emit& emit, Item it, i64 cap);
  // Split the oldest pending group: its first `cap` samples go to this batch.
  template <class Emit> void split_front(Emit& emit, i64 cap) {
    Item it = st_.pending.front();
    st_.pending.erase(st_.pending.begin());
    split_item(emit, it, cap);
  }
  template <class Emit> i64 start_batch(Emit& emit, i64 count);
  template <class Emit> i64 place_subset(Emit& emit, i64 cap);
  template <class Emit> i64 emit_chosen(Emit& emit, i64 left);
  template <class Emit> void normal(Emit& emit, i64 count);
  template <class Emit> void close(Emit& emit, i64 count);
  void enter(i64 epoch);
  const Permutation& order();
  Item pull();
  void fill_window();
  void maybe_next_epoch();
  i64 load() const;

  i64 n_, num_groups_;
  const i64* starts_;
  u64 seed_, key_;
  int window_;
  i64 fit_ = 0;
  bool closing_ = false;
  State st_;
  Permutation fe_;
  i64 fe_epoch_ = -1;
  std::vector<u64> reach_;  // subset-sum bitsets, reused
  std::vector<int> fits_;
  std::vector<char> chosen_;
  std::vector<Item> keep_;
  std::vector<i64> ahead_;
};

// ------------------------------------------------------------ GroupPacker (inline)
inline GroupPacker::GroupPacker(i64 n, const i64* starts, i64 num_groups, u64 seed, u64 key,
                                i64 start, int window)
    : n_(n), num_groups_(num_groups), starts_(starts), seed_(seed), key_(key), window_(window) {
  enter(start / n);
  i64 target = start % n;
  while (st_.pulled < target) {
    Item it = pull();
    if (st_.pulled > target) {  // the stage starts inside this group
      st_.has_partial = true;
      st_.partial = it;
      st_.done = it.size - (st_.pulled - target);
    }
  }
}

inline void GroupPacker::enter(i64 epoch) { st_.epoch = epoch, st_.q = 0, st_.pulled = 0; }

inline const Permutation& GroupPacker::order() {
  if (fe_epoch_ != st_.epoch) {
    fe_ = Permutation(num_groups_, epoch_key(seed_, key_, static_cast<u64>(st_.epoch)));
    fe_epoch_ = st_.epoch;
  }
  return fe_;
}

inline GroupPacker::Item GroupPacker::pull() {
  i64 g = order()(st_.q);
  i64 size = starts_[g + 1] - starts_[g];
  ++st_.q;
  st_.pulled += size;
  return Item{g, size};
}

// Pull groups until the window is full or the epoch is exhausted. The group order is
// random, so reading the group sizes misses the cache: compute the next group ids first
// and prefetch their starts (same result as calling pull() repeatedly).
inline void GroupPacker::fill_window() {
  const i64 m = std::min<i64>(window_ - static_cast<i64>(st_.pending.size()), num_groups_ - st_.q);
  if (m <= 0) return;
  ahead_.resize(m);
  const Permutation& fe = order();
  for (i64 i = 0; i < m; ++i) {
    ahead_[i] = fe(st_.q + i);
    __builtin_prefetch(starts_ + ahead_[i]);
  }
  for (i64 i = 0; i < m; ++i) {
    const i64 g = ahead_[i], size = starts_[g + 1] - starts_[g];
    st_.pulled += size;
    st_.pending.push_back(Item{g, size});
  }
  st_.q += m;
}

inline void GroupPacker::maybe_next_epoch() {
  if (st_.q == num_groups_ && st_.pending.empty() && !st_.has_partial) enter(st_.epoch + 1);
}

inline i64 GroupPacker::load() const {
  i64 s = st_.has_partial ? st_.partial.size - st_.done : 0;
  for (const auto& it : st_.pending) s += it.size;
  return s;
}

inline i64 GroupPacker::end_offset() const {
  i64 rest = st_.has_partial ? st_.partial.size - st_.done : 0;
  return st_.epoch * n_ + st_.pulled - rest;
}

template <class Emit>
void GroupPacker::emit_range(Emit& emit, i64 g, i64 lo, i64 hi) {
  if (lo == hi) return;
  if (lo == 0) ++st_.total, st_.fit_total += starts_[g + 1] - starts_[g] <= fit_;
  if (st_.first_touched < 0) st_.first_touched = st_.epoch;
  st_.last_touched = st_.epoch;
  for (i64 s = starts_[g] + lo; s < starts_[g] + hi; ++s) emit(s);
}

template <class Emit>
void GroupPacker::split_item(Emit& emit, Item it, i64 cap) {
  emit_range(emit, it.group, 0, cap);
  st_.has_partial = true;
  st_.partial = it;
  st_.done = cap;
  ++st_.split;
  st_.fit_split += it.size <= fit_;
}

template <class Emit>
i64 GroupPacker::start_batch(Emit& emit, i64 count) {
  i64 cap = count;
  if (st_.has_partial) {  // a group already started continues first (consecutive batches)
    i64 take = std::min(cap, st_.partial.size - st_.done);
    emit_range(emit, st_.partial.group, st_.done, st_.done + take);
    st_.done += take;
    if (st_.done == st_.partial.size) st_.has_partial = false;
    cap -= take;
  }
  return cap;
}

// Place the pending groups forming an exact-sum subset for `cap` (older groups first),
// or, if none exists, the largest sum below it. Returns the capacity left.
template <class Emit>
i64 GroupPacker::place_subset(Emit& emit, i64 cap) {
  std::vector<int>& fits = fits_;
  fits.clear();
  i64 fit_sum = 0;
  for (int i = 0; i < (int)st_.pending.size(); ++i)
    if (st_.pending[i].size <= cap) fits.push_back(i), fit_sum += st_.pending[i].size;
  const int n = static_cast<int>(fits.size());
  chosen_.assign(st_.pending.size(), 0);
  if (fit_sum <= cap) {  // the DP would take every fitting group: skip it
    for (int i : fits) chosen_[i] = 1;
    return emit_chosen(emit, cap - fit_sum);
  }
  const i64 words = cap / 64 + 1;
  reach_.assign(static_cast<size_t>((n + 1) * words), 0);
  auto row = [&](int i) { return reach_.data() + static_cast<size_t>(i) * words; };
  row(n)[0] = 1;
  const int top_bits = static_cast<int>(cap % 64) + 1;
  const u64 top_mask = top_bits == 64 ? ~0ull : ((1ull << top_bits) - 1);
  for (int i = n - 1; i >= 0; --i) {  // reach[i] = reach[i+1] | reach[i+1] << size
    const u64* src = row(i + 1);
    u64* dst = row(i);
    const i64 s = st_.pending[fits[i]].size, ws = s / 64;
    const int bs = static_cast<int>(s % 64);
    for (i64 w = 0; w < words; ++w) {
      u64 v = 0;
      if (w >= ws) {
        v = src[w - ws] << bs;
        if (bs && w - ws - 1 >= 0) v |= src[w - ws - 1] >> (64 - bs);
      }
      dst[w] = src[w] | v;
    }
    dst[words - 1] &= top_mask;
  }
  auto has = [&](int i, i64 v) { return (row(i)[v / 64] >> (v % 64)) & 1ull; };
  i64 target = cap;
  if (!has(0, cap)) {
    target = 0;
    for (i64 w = words - 1; w >= 0; --w)
      if (row(0)[w]) { target = w * 64 + bit_length(row(0)[w]) - 1; break; }
  }
  i64 rest = target;
  for (int i = 0; i < n; ++i) {
    const i64 s = st_.pending[fits[i]].size;
    if (s <= rest && has(i + 1, rest - s)) chosen_[fits[i]] = 1, rest -= s;
  }
  return emit_chosen(emit, cap - target);
}

// Emit the chosen pending groups in order and keep the others pending.
template <class Emit>
i64 GroupPacker::emit_chosen(Emit& emit, i64 left) {
  keep_.clear();
  for (size_t i = 0; i < st_.pending.size(); ++i) {
    if (chosen_[i]) emit_range(emit, st_.pending[i].group, 0, st_.pending[i].size);
    else keep_.push_back(st_.pending[i]);
  }
  st_.pending.swap(keep_);
  return left;
}

template <class Emit>
void GroupPacker::normal(Emit& emit, i64 count) {
  i64 cap = start_batch(emit, count);
  while (cap > 0) {
    maybe_next_epoch();
    fill_window();
    if (cap == count && st_.pending.front().size > count) {  // larger than the batch share
      split_front(emit, cap);
      return;
    }
    cap = place_subset(emit, cap);
    if (cap > 0 && !st_.pending.empty()) {
      split_front(emit, cap);
      return;
    }
  }
}

template <class Emit>
void GroupPacker::close(Emit& emit, i64 count) {
  i64 cap = start_batch(emit, count);
  while (cap > 0) {
    if (!st_.pending.empty()) {
      cap = place_subset(emit, cap);
      if (cap > 0 && !st_.pending.empty()) {
        split_front(emit, cap);
        return;
      }
    } else {
      maybe_next_epoch();
      Item it = pull();
      if (it.size <= cap) {
        emit_range(emit, it.group, 0, it.size);
        cap -= it.size;
      } else {
        split_item(emit, it, cap);
        return;
      }
    }
  }
}

// Normal mode looks ahead (out-of-order groups wait in `pending`); once the pending
// samples would no longer fit in the rest of the stage it switches to closing mode for
// good, which drains `pending` before pulling in order, so the stage ends prefix-closed
// and the next stage can continue from a single stream offset.
template <class Emit>
void GroupPacker::batch(i64 count, i64 remaining_after, Emit& emit) {
  if (!closing_) {
    State saved = st_;
    normal(emit, count);
    if (load() <= remaining_after) return;
    st_ = saved;
    emit.reset();  // the same output slots are rewritten by close()
    closing_ = true;
  }
  close(emit, count);
}

// ------------------------------------------------------------- FlexPacker (inline)
// Whole-group consumption of a grouped dataset whose per-batch count follows its groups.
// Groups are taken strictly in stream order, so the consumed part is always a stream
// prefix. With the cumulative target T_k (in units of 1/kQ) and C samples taken so far:
//   * a group of size s <= fit (the batch's fit limit) is taken whole iff C + s/2 <= T_k
//     (taking it leaves C nearer T_k than not) and s <= the slots left in the batch;
//     otherwise the batch closes and the group waits for the next one;
//   * a larger group starts when round(T_k - C) >= 1 and takes round(T_k - C) samples
//     per batch (at least 1 while the target grows by >= 1 per batch, so consecutive
//     batches), capped by the slots left.
// Hence, while the cap never binds, -S/2 < C_k - T_k <= max(S, 1)/2 after every batch,
// S the largest group taken whole or considered for it (see plan.py, "Whole groups").
class FlexPacker {
 public:
  FlexPacker(i64 n, const i64* starts, i64 num_groups, u64 seed, u64 key, i64 start)
      : n_(n), num_groups_(num_groups), starts_(starts), seed_(seed), key_(key) {
    epoch_ = start / n;
    const i64 target = start % n;
    while (pulled_ < target) {
      const i64 g = order()(q_), size = starts_[g + 1] - starts_[g];
      ++q_, pulled_ += size;
      if (pulled_ > target) partial_g_ = g, partial_size_ = size, done_ = size - (pulled_ - target);
    }
  }

  // Samples for one batch, appended to `out`. tq: cumulative target through this batch
  // times kQ; cap: slots left in the batch; fit: the batch's fit limit; force: a started
  // large group takes >= 1 sample (the target grows by >= 1 per batch).
  i64 batch(u128 tq, i64 cap, i64 fit, bool force, std::vector<i64>& out) {
    const i64 before = taken_;
    if (partial_g_ >= 0) {
      const i64 want = std::max<i64>(rounded_gap(tq), force ? 1 : 0);
      const i64 piece = std::min({want, partial_size_ - done_, cap});
      emit(out, partial_g_, done_, done_ + piece);
      done_ += piece, cap -= piece;
      if (done_ < partial_size_) return taken_ - before;
      partial_g_ = -1;
    }
    for (;;) {
      if (q_ == num_groups_) epoch_ += 1, q_ = 0, pulled_ = 0;
      const i64 g = order()(q_), size = starts_[g + 1] - starts_[g];
      if (size <= fit) {
        // C + s/2 <= T  <=>  2 C kQ + s kQ <= 2 T kQ
        if ((static_cast<u128>(2 * taken_ + size) << kQBits) > 2 * tq || size > cap) break;
        ++q_, pulled_ += size, ++total_, ++fit_total_;
        emit(out, g, 0, size);
        cap -= size;
      } else {
        const i64 piece = std::min({rounded_gap(tq), size, cap});
        if (piece < 1) break;
        ++q_, pulled_ += size, ++total_;
        emit(out, g, 0, piece);
        cap -= piece;
        if (piece < size) {
          ++split_;
          partial_g_ = g, partial_size_ = size, done_ = piece;
          break;
        }
      }
    }
    return taken_ - before;
  }
  i64 end_offset() const { return epoch_ * n_ + pulled_ - (partial_g_ >= 0 ? partial_size_ - done_ : 0); }
  i64 groups_split() const { return split_; }
  i64 groups_total() const { return total_; }
  i64 groups_fit() const { return fit_total_; }
  i64 epochs_touched() const { return first_touched_ < 0 ? 0 : last_touched_ - first_touched_ + 1; }

 private:
  // round(T - C) with halves rounded up; <= 0 when T - C < 1/2.
  i64 rounded_gap(u128 tq) const {
    const u128 c = static_cast<u128>(taken_) << kQBits;
    if (tq + kQ / 2 < c + kQ) return 0;
    return static_cast<i64>((tq + kQ / 2 - c) >> kQBits);
  }
  void emit(std::vector<i64>& out, i64 g, i64 lo, i64 hi) {
    if (lo == hi) return;
    if (first_touched_ < 0) first_touched_ = epoch_;
    last_touched_ = epoch_;
    for (i64 s = starts_[g] + lo; s < starts_[g] + hi; ++s) out.push_back(s);
    taken_ += hi - lo;
  }
  const Permutation& order() {
    if (fe_epoch_ != epoch_) {
      fe_ = Permutation(num_groups_, epoch_key(seed_, key_, static_cast<u64>(epoch_)));
      fe_epoch_ = epoch_;
    }
    return fe_;
  }

  i64 n_, num_groups_;
  const i64* starts_;
  u64 seed_, key_;
  i64 epoch_ = 0, q_ = 0, pulled_ = 0, taken_ = 0;
  i64 partial_g_ = -1, partial_size_ = 0, done_ = 0;
  i64 split_ = 0, total_ = 0, fit_total_ = 0, first_touched_ = -1, last_touched_ = -1;
  Permutation fe_;
  i64 fe_epoch_ = -1;
};

}  // namespace phoenix_plan
