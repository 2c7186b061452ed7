// onelayer_fast._planner: the host-side planner for padding-free packing and GiGPO anchor grouping.
//
// Four ops, each mirrored by a pure-Python reference in onelayer_fast/planner.py (`<op>_ref`) that the
// tests compare against exactly:
//   plan_microbatches(lengths, token_budget, method, group_ids) -> micro-batches (lists of sequence indices)
//   pack(lengths, microbatch, padded_len, padding_side)         -> cu_seqlens, position_ids, gather/unpack indices
//   pack_layout(prompt_lens, completion_lens, prompt_width,     -> packed rows of a [prompt | completion] batch:
//               completion_width, group_size, token_budget)        token / position / segment / branch ids,
//                                                                  state and target indices (packing.build_layout)
//   anchor_groups(group_ids, observations)                      -> dense anchor id per step
// Every input is checked here, at the boundary: a bad value raises ValueError, a wrong element type TypeError.
// No torch dependency: inputs arrive as anything numpy.asarray accepts, outputs leave as numpy arrays (the
// Python wrapper turns them into tensors without a copy).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::optional arguments: None <-> nullopt

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// --------------------------------------------------------------------------------------------------
// Boundary: Python objects -> validated std::vector<int64_t>
// --------------------------------------------------------------------------------------------------

// A 1-D integer sequence (list, tuple, numpy array, CPU torch tensor) as int64. Floats and bools are a
// TypeError rather than a silent cast: a length of 3.7 is a bug upstream, not something to round.
std::vector<int64_t> to_int64(py::handle obj, const char* name) {
    if (obj.is_none()) throw py::type_error(std::string(name) + " must be a 1-D integer sequence, got None");
    py::array arr = py::module_::import("numpy").attr("asarray")(obj);
    if (arr.ndim() != 1) {
        throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(arr.ndim()) + " dimensions");
    }
    const auto n = static_cast<size_t>(arr.shape(0));
    if (n == 0) return {};  // np.asarray([]) is float64: emptiness is checked by each op, not the dtype
    const char kind = arr.dtype().kind();
    if (kind != 'i' && kind != 'u') {
        throw py::type_error(std::string(name) + " must hold integers, got numpy dtype " +
                             py::str(arr.dtype()).cast<std::string>());
    }
    if (kind == 'u' && arr.dtype().itemsize() == 8) {  // uint64 above 2^63 - 1 would wrap to negative
        if (py::int_(arr.attr("max")()).cast<uint64_t>() > static_cast<uint64_t>(kInt64Max)) {
            throw py::value_error(std::string(name) + " has a value above 2^63 - 1");
        }
    }
    auto values = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
    if (!values) throw py::error_already_set();
    return std::vector<int64_t>(values.data(), values.data() + n);
}

std::vector<int64_t> checked_lengths(py::handle obj) {
    std::vector<int64_t> lengths = to_int64(obj, "lengths");
    if (lengths.empty()) throw py::value_error("lengths must not be empty");
    for (size_t i = 0; i < lengths.size(); ++i) {
        if (lengths[i] < 0) {
            throw py::value_error("lengths[" + std::to_string(i) + "] = " + std::to_string(lengths[i]) +
                                  " is negative");
        }
    }
    return lengths;
}

void check_same_size(size_t n, size_t m, const char* a, const char* b) {
    if (n != m) {
        throw py::value_error(std::string(a) + " and " + b + " must have the same size, got " + std::to_string(n) +
                              " and " + std::to_string(m));
    }
}

// Copies a flat result into a new numpy array (under the GIL).
template <typename T>
py::array_t<T> to_numpy(const std::vector<T>& values) {
    py::array_t<T> out(static_cast<py::ssize_t>(values.size()));
    std::copy(values.begin(), values.end(), out.mutable_data());
    return out;
}

// --------------------------------------------------------------------------------------------------
// plan_microbatches
// --------------------------------------------------------------------------------------------------

using Bins = std::vector<std::vector<int64_t>>;  // unit indices per bin; empty result = infeasible

// Largest-first (LPT): units by decreasing weight (ties: lower index first) each go to the least-loaded of
// k bins (ties: lower bin). The least-loaded bin is the only candidate worth trying: if the unit does not
// fit there it fits nowhere, and k bins are infeasible for this heuristic.
Bins largest_first(const std::vector<int64_t>& weights, int64_t k, int64_t budget) {
    std::vector<int64_t> order(weights.size());
    for (size_t u = 0; u < order.size(); ++u) order[u] = static_cast<int64_t>(u);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return weights[a] != weights[b] ? weights[a] > weights[b] : a < b;
    });
    using Load = std::pair<int64_t, int64_t>;  // (load, bin): min-heap order = heapq's tuple order
    std::vector<Load> init;
    init.reserve(k);
    for (int64_t b = 0; b < k; ++b) init.emplace_back(0, b);
    std::priority_queue<Load, std::vector<Load>, std::greater<Load>> heap(std::greater<Load>(), std::move(init));
    Bins bins(k);
    for (int64_t u : order) {
        auto [load, b] = heap.top();
        if (weights[u] > budget - load) return {};
        heap.pop();
        bins[b].push_back(u);
        heap.emplace(load + weights[u], b);
    }
    return bins;
}

// Karmarkar-Karp largest differencing for k-way partitioning. Each unit starts as a k-tuple of bin sums
// (its weight, then k - 1 empty bins); the two tuples with the largest spread (max - min; ties: lower id)
// are merged by pairing the largest sum of one with the smallest of the other, re-sorted, and pushed back
// until one tuple is left: its bins are the partition.
//
// Definition (the dense one of planner_ref): a tuple is k slots sorted by (sum desc, empty last), stably;
// merge slot j = A[j] + B[k - 1 - j]. Here a tuple stores only its occupied slots, in that order, the
// empty ones being implicit at the end; since an occupied slot always sorts before an empty one, stably
// sorting the occupied slots of a merge by sum alone gives the same order. That makes a merge O(a + b)
// in the occupied counts instead of O(k), which matters early on, when most tuples hold one unit.
struct Slot {
    int64_t sum;
    int64_t head;  // first unit of this slot's linked list (next[]); units are moved, never copied
    int64_t tail;
};

Bins karmarkar_karp(const std::vector<int64_t>& weights, int64_t k, int64_t budget) {
    const auto n_units = static_cast<int64_t>(weights.size());
    std::vector<int64_t> next(n_units, -1);
    std::vector<std::vector<Slot>> tuples;
    tuples.reserve(2 * n_units);
    auto spread = [k](const std::vector<Slot>& t) -> int64_t {
        if (t.empty()) return 0;
        const int64_t low = static_cast<int64_t>(t.size()) < k ? 0 : t.back().sum;
        return t.front().sum - low;
    };
    using Entry = std::pair<int64_t, int64_t>;  // (spread, tuple id)
    // Top = largest spread, then lowest id (heapq on (-spread, id) in the reference).
    auto lower_priority = [](const Entry& x, const Entry& y) {
        return x.first != y.first ? x.first < y.first : x.second > y.second;
    };
    std::priority_queue<Entry, std::vector<Entry>, decltype(lower_priority)> heap(lower_priority);
    for (int64_t u = 0; u < n_units; ++u) {
        tuples.push_back({Slot{weights[u], u, u}});
        heap.emplace(spread(tuples.back()), u);
    }
    while (heap.size() > 1) {
        const int64_t ia = heap.top().second;
        heap.pop();
        const int64_t ib = heap.top().second;
        heap.pop();
        std::vector<Slot> a = std::move(tuples[ia]), b = std::move(tuples[ib]);
        std::vector<Slot>().swap(tuples[ia]);
        std::vector<Slot>().swap(tuples[ib]);
        const auto na = static_cast<int64_t>(a.size()), nb = static_cast<int64_t>(b.size());
        const int64_t first_b = k - nb;  // merged positions j >= first_b receive b[k - 1 - j]
        std::vector<Slot> merged;
        merged.reserve(std::min<int64_t>(k, na + nb));
        auto take = [&](int64_t j) {
            const bool has_a = j < na, has_b = j >= first_b;
            if (has_a && has_b) {
                const Slot& sa = a[j];
                const Slot& sb = b[k - 1 - j];
                next[sa.tail] = sb.head;
                merged.push_back(Slot{sa.sum + sb.sum, sa.head, sb.tail});
            } else {
                merged.push_back(has_a ? a[j] : b[k - 1 - j]);
            }
        };
        for (int64_t j = 0; j < na; ++j) take(j);
        for (int64_t j = std::max(na, first_b); j < k; ++j) take(j);
        std::stable_sort(merged.begin(), merged.end(), [](const Slot& x, const Slot& y) { return x.sum > y.sum; });
        tuples.push_back(std::move(merged));
        heap.emplace(spread(tuples.back()), static_cast<int64_t>(tuples.size()) - 1);
    }
    const std::vector<Slot>& last = tuples[heap.top().second];
    Bins bins;
    bins.reserve(last.size());
    for (const Slot& s : last) {
        if (s.sum > budget) return {};
        std::vector<int64_t> members;
        for (int64_t u = s.head; u != -1; u = next[u]) members.push_back(u);
        bins.push_back(std::move(members));
    }
    return bins;
}

// The fewest bins the heuristic can fit: start at a lower bound no partition can beat (total / budget,
// and one bin per unit heavier than half the budget, since no two of those can share), gallop up by
// 1, 2, 4, ... to a feasible k (k = #units always is: every unit alone, each within the budget), then
// bisect back down. Heuristic feasibility is not strictly monotone in k, so this finds a locally
// minimal k, always one that was actually verified.
template <typename Balance>
Bins fewest_bins(const std::vector<int64_t>& weights, int64_t total, int64_t budget, Balance balance) {
    const auto n_units = static_cast<int64_t>(weights.size());
    int64_t heavy = 0;
    for (int64_t w : weights) heavy += w > budget - w;
    int64_t k = std::min(n_units, std::max<int64_t>({1, total / budget + (total % budget != 0), heavy}));
    int64_t infeasible = k - 1, step = 1;
    Bins best = balance(weights, k, budget);
    while (best.empty()) {
        infeasible = k;
        k = std::min(n_units, k + step);
        step *= 2;
        best = balance(weights, k, budget);
    }
    int64_t feasible = k;
    while (feasible - infeasible > 1) {
        const int64_t mid = infeasible + (feasible - infeasible) / 2;
        Bins plan = balance(weights, mid, budget);
        if (plan.empty()) {
            infeasible = mid;
        } else {
            feasible = mid;
            best = std::move(plan);
        }
    }
    return best;
}

py::list plan_microbatches(py::object lengths_obj, int64_t token_budget, const std::string& method,
                           py::object group_ids_obj) {
    const std::vector<int64_t> lengths = checked_lengths(lengths_obj);
    if (token_budget <= 0) throw py::value_error("token_budget must be positive, got " + std::to_string(token_budget));
    if (method != "largest_first" && method != "karmarkar_karp") {
        throw py::value_error("method must be 'largest_first' or 'karmarkar_karp', got '" + method + "'");
    }
    const auto n = static_cast<int64_t>(lengths.size());

    // Units: one per sequence, or one per group (first-seen order) so that a group is never split.
    std::vector<std::vector<int64_t>> units;
    std::vector<int64_t> unit_group;
    if (group_ids_obj.is_none()) {
        units.reserve(n);
        for (int64_t i = 0; i < n; ++i) units.push_back({i});
    } else {
        const std::vector<int64_t> groups = to_int64(group_ids_obj, "group_ids");
        check_same_size(lengths.size(), groups.size(), "lengths", "group_ids");
        std::unordered_map<int64_t, int64_t> unit_of;
        unit_of.reserve(n);
        for (int64_t i = 0; i < n; ++i) {
            auto [it, fresh] = unit_of.try_emplace(groups[i], static_cast<int64_t>(units.size()));
            if (fresh) {
                units.emplace_back();
                unit_group.push_back(groups[i]);
            }
            units[it->second].push_back(i);
        }
    }
    std::vector<int64_t> weights(units.size(), 0);
    int64_t total = 0;
    for (size_t u = 0; u < units.size(); ++u) {
        for (int64_t i : units[u]) {
            if (lengths[i] > kInt64Max - weights[u]) throw py::value_error("lengths sum to more than 2^63 - 1 tokens");
            weights[u] += lengths[i];
        }
        if (weights[u] > token_budget) {
            if (unit_group.empty()) {
                throw py::value_error("sequence " + std::to_string(units[u][0]) + " has " + std::to_string(weights[u]) +
                                      " tokens, more than token_budget = " + std::to_string(token_budget) +
                                      ": raise the budget or truncate the sequence");
            }
            throw py::value_error("group " + std::to_string(unit_group[u]) + " (" + std::to_string(units[u].size()) +
                                  " sequences) has " + std::to_string(weights[u]) +
                                  " tokens, more than token_budget = " + std::to_string(token_budget) +
                                  ": a group is never split, so raise the budget or plan without group_ids");
        }
        if (weights[u] > kInt64Max - total) throw py::value_error("lengths sum to more than 2^63 - 1 tokens");
        total += weights[u];
    }

    std::vector<std::vector<int64_t>> batches;
    {
        py::gil_scoped_release release;  // everything below is plain C++ on copies
        const Bins bins = method == "largest_first" ? fewest_bins(weights, total, token_budget, largest_first)
                                                    : fewest_bins(weights, total, token_budget, karmarkar_karp);
        std::vector<int64_t> loads;
        for (const auto& bin : bins) {
            std::vector<int64_t> batch;
            for (int64_t u : bin) batch.insert(batch.end(), units[u].begin(), units[u].end());
            if (batch.empty()) continue;
            std::sort(batch.begin(), batch.end());
            batches.push_back(std::move(batch));
        }
        // Heaviest micro-batch first (ties: lowest first index), so that a caching allocator sizes its
        // blocks for the peak on the first one.
        for (const auto& batch : batches) {
            int64_t load = 0;
            for (int64_t i : batch) load += lengths[i];
            loads.push_back(load);
        }
        std::vector<size_t> order(batches.size());
        for (size_t b = 0; b < order.size(); ++b) order[b] = b;
        std::sort(order.begin(), order.end(), [&](size_t x, size_t y) {
            return loads[x] != loads[y] ? loads[x] > loads[y] : batches[x][0] < batches[y][0];
        });
        std::vector<std::vector<int64_t>> sorted;
        sorted.reserve(batches.size());
        for (size_t b : order) sorted.push_back(std::move(batches[b]));
        batches = std::move(sorted);
    }
    py::list out(batches.size());
    for (size_t b = 0; b < batches.size(); ++b) {
        py::list batch(batches[b].size());
        for (size_t j = 0; j < batches[b].size(); ++j) batch[j] = py::int_(batches[b][j]);
        out[b] = std::move(batch);
    }
    return out;
}

// --------------------------------------------------------------------------------------------------
// pack
// --------------------------------------------------------------------------------------------------

// One micro-batch of a padded (B, T) layout, packed without padding:
//   cu_seqlens   (m + 1,) int32   cumulative lengths, flash-attn varlen convention
//   position_ids (total,) int64   0..L-1 within each sequence
//   gather_index (total,) int64   flat index b * T + t of each packed token in the (B, T) layout
//   unpack_index (m, T)   int64   packed token index at each position of the micro-batch's rows, -1 at pads
//   max_seqlen    int
// Sequence b occupies t in [0, L_b) (right padding) or [T - L_b, T) (left padding).
py::tuple pack(py::object lengths_obj, py::object microbatch_obj, int64_t padded_len, const std::string& padding_side) {
    const std::vector<int64_t> lengths = checked_lengths(lengths_obj);
    const std::vector<int64_t> rows = to_int64(microbatch_obj, "microbatch");
    if (rows.empty()) throw py::value_error("microbatch must not be empty");
    if (padding_side != "right" && padding_side != "left") {
        throw py::value_error("padding_side must be 'right' or 'left', got '" + padding_side + "'");
    }
    const auto n = static_cast<int64_t>(lengths.size());
    const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
    if (padded_len < 0) padded_len = longest;  // -1: the tightest (B, T) layout
    if (padded_len < longest) {
        throw py::value_error("padded_len = " + std::to_string(padded_len) + " is shorter than the longest sequence (" +
                              std::to_string(longest) + " tokens)");
    }
    if (padded_len > 0 && n > kInt64Max / padded_len) throw py::value_error("len(lengths) * padded_len overflows int64");
    std::vector<char> seen(n, 0);
    int64_t total = 0, max_seqlen = 0;
    for (size_t r = 0; r < rows.size(); ++r) {
        const int64_t b = rows[r];
        if (b < 0 || b >= n) {
            throw py::value_error("microbatch[" + std::to_string(r) + "] = " + std::to_string(b) +
                                  " is out of range for " + std::to_string(n) + " sequences");
        }
        if (seen[b]) throw py::value_error("microbatch lists sequence " + std::to_string(b) + " twice");
        seen[b] = 1;
        total += lengths[b];  // <= B * T, checked above
        max_seqlen = std::max(max_seqlen, lengths[b]);
    }
    if (total > std::numeric_limits<int32_t>::max()) {
        throw py::value_error("the micro-batch holds " + std::to_string(total) + " tokens: cu_seqlens is int32");
    }
    const auto m = static_cast<py::ssize_t>(rows.size());
    py::array_t<int32_t> cu_seqlens(m + 1);
    py::array_t<int64_t> position_ids(total), gather_index(total);
    py::array_t<int64_t> unpack_index({m, static_cast<py::ssize_t>(padded_len)});
    int32_t* cu = cu_seqlens.mutable_data();
    int64_t* pos = position_ids.mutable_data();
    int64_t* gather = gather_index.mutable_data();
    int64_t* unpack = unpack_index.mutable_data();
    {
        py::gil_scoped_release release;
        const bool left = padding_side == "left";
        std::fill(unpack, unpack + m * padded_len, int64_t{-1});
        int64_t k = 0;
        cu[0] = 0;
        for (py::ssize_t r = 0; r < m; ++r) {
            const int64_t b = rows[r], len = lengths[b];
            const int64_t start = left ? padded_len - len : 0;
            for (int64_t t = 0; t < len; ++t, ++k) {
                pos[k] = t;
                gather[k] = b * padded_len + start + t;
                unpack[r * padded_len + start + t] = k;
            }
            cu[r + 1] = static_cast<int32_t>(k);
        }
    }
    return py::make_tuple(cu_seqlens, position_ids, gather_index, unpack_index, max_seqlen);
}

// --------------------------------------------------------------------------------------------------
// pack_layout
// --------------------------------------------------------------------------------------------------

// Every value of `values` lies in [low, high]; the error names the first one that does not.
void check_each_in(const std::vector<int64_t>& values, int64_t low, int64_t high, const char* name,
                   const std::string& range) {
    for (size_t i = 0; i < values.size(); ++i) {
        if (values[i] < low || values[i] > high) {
            throw py::value_error(std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(values[i]) +
                                  " is outside " + range);
        }
    }
}

// Packed rows of segments: the micro-batches of plan_microbatches(lengths, budget, "largest_first") (fewest
// rows, loads balanced), each row's segments ascending, rows by their first segment so that the packed
// batch keeps the batch's order as far as the plan allows.
std::vector<std::vector<int64_t>> plan_packed_rows(const std::vector<int64_t>& lengths, int64_t total,
                                                   int64_t budget) {
    std::vector<std::vector<int64_t>> rows;
    for (auto& row : fewest_bins(lengths, total, budget, largest_first)) {
        if (row.empty()) continue;
        std::sort(row.begin(), row.end());
        rows.push_back(std::move(row));
    }
    std::sort(rows.begin(), rows.end(), [](const auto& x, const auto& y) { return x.front() < y.front(); });
    return rows;
}

// The packed layout of a rollout batch of B rows [prompt left-padded to P | completion right-padded to C], as
// onelayer_fast.packing.build_layout runs it. A segment is either one row's prompt + completion (group_size
// None: layout "packed", branch 0 throughout) or a group of G consecutive rows sharing one prompt: the
// prompt once, then each row's completion, all continuing the prompt's positions (layout "shared_prompt":
// branch k + 1 marks the group's k-th completion). Segments are planned into rows of at most token_budget
// tokens (default max(P + C, the longest segment)) by plan_packed_rows and laid out left to right.
// Returns, for S packed rows of L tokens (L: the fullest row; the rest of a row is row padding):
//   token_index  (S, L) int64  flat index b * (P + C) + t of each token in the [prompt | completion] layout, -1
//                              on row padding (the segment's prompt is taken from the group's first row)
//   position_ids (S, L) int64  rotary positions, 0 at each segment's first token (0 on row padding)
//   segment_ids  (S, L) int64  segment index, -1 on row padding
//   branch_ids   (S, L) int64  0: seen by the whole segment; k + 1: the k-th completion of a group
//   state_index  (N,)   int64  flat index into S * L of the state that predicts each real completion token
//   target_index (N,)   int64  that token's flat index b * C + t in the (B, C) completion layout
// in the order the completions appear in the packed rows.
py::tuple pack_layout(py::object prompt_lens_obj, py::object completion_lens_obj, int64_t prompt_width,
                      int64_t completion_width, std::optional<int64_t> group_size,
                      std::optional<int64_t> token_budget) {
    const std::vector<int64_t> prompt_lens = to_int64(prompt_lens_obj, "prompt_lens");
    const std::vector<int64_t> completion_lens = to_int64(completion_lens_obj, "completion_lens");
    if (prompt_lens.empty()) throw py::value_error("prompt_lens must not be empty");
    check_same_size(prompt_lens.size(), completion_lens.size(), "prompt_lens", "completion_lens");
    if (prompt_width < 1) {
        throw py::value_error("prompt_width must be at least 1 (every prompt has a real token), got " +
                              std::to_string(prompt_width));
    }
    if (completion_width < 0) {
        throw py::value_error("completion_width must not be negative, got " + std::to_string(completion_width));
    }
    const auto rows = static_cast<int64_t>(prompt_lens.size());
    if (completion_width > kInt64Max - prompt_width || rows > kInt64Max / (prompt_width + completion_width)) {
        throw py::value_error("rows * (prompt_width + completion_width) overflows int64");
    }
    const int64_t row_width = prompt_width + completion_width;
    // A prompt's last real token predicts the first completion token, so a prompt cannot be empty.
    check_each_in(prompt_lens, 1, prompt_width, "prompt_lens", "[1, prompt_width = " + std::to_string(prompt_width) +
                  "] (left-padded prompts with at least one real token)");
    check_each_in(completion_lens, 0, completion_width, "completion_lens",
                  "[0, completion_width = " + std::to_string(completion_width) + "]");
    const bool shared = group_size.has_value();
    const int64_t group = group_size.value_or(1);
    if (group < 1) throw py::value_error("group_size must be positive, got " + std::to_string(group));
    if (rows % group != 0) {
        throw py::value_error("the batch (" + std::to_string(rows) + " rows) is not whole groups of group_size = " +
                              std::to_string(group) + " rows");
    }
    const int64_t n_segments = rows / group;
    std::vector<int64_t> lengths(n_segments);
    int64_t total = 0, longest = 0, n_targets = 0;  // every sum is at most rows * row_width: no overflow
    for (int64_t s = 0; s < n_segments; ++s) {
        const int64_t first = s * group;
        lengths[s] = prompt_lens[first];
        for (int64_t b = first; b < first + group; ++b) {
            if (prompt_lens[b] != prompt_lens[first]) {
                throw py::value_error("rows " + std::to_string(first) + " and " + std::to_string(b) + " of group " +
                                      std::to_string(s) + " have prompts of " + std::to_string(prompt_lens[first]) +
                                      " and " + std::to_string(prompt_lens[b]) +
                                      " tokens: the rows of a group share one prompt");
            }
            lengths[s] += completion_lens[b];
            n_targets += completion_lens[b];
        }
        total += lengths[s];
        longest = std::max(longest, lengths[s]);
    }
    const int64_t budget = token_budget.value_or(std::max(row_width, longest));
    if (budget <= 0) throw py::value_error("token_budget must be positive, got " + std::to_string(budget));
    if (budget < longest) {
        throw py::value_error("token_budget = " + std::to_string(budget) + " is smaller than the longest segment (" +
                              std::to_string(longest) + " tokens)");
    }

    std::vector<std::vector<int64_t>> plan;
    int64_t width = 0;
    {
        py::gil_scoped_release release;
        plan = plan_packed_rows(lengths, total, budget);
        for (const auto& row : plan) {
            int64_t load = 0;
            for (int64_t s : row) load += lengths[s];
            width = std::max(width, load);
        }
    }
    const auto n_rows = static_cast<int64_t>(plan.size());
    if (width > 0 && n_rows > kInt64Max / width) throw py::value_error("packed rows * row length overflows int64");
    const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(n_rows), static_cast<py::ssize_t>(width)};
    py::array_t<int64_t> token_index(shape), position_ids(shape), segment_ids(shape), branch_ids(shape);
    py::array_t<int64_t> state_index(n_targets), target_index(n_targets);
    int64_t* token = token_index.mutable_data();
    int64_t* position = position_ids.mutable_data();
    int64_t* segment = segment_ids.mutable_data();
    int64_t* branch = branch_ids.mutable_data();
    int64_t* state = state_index.mutable_data();
    int64_t* target = target_index.mutable_data();
    {
        py::gil_scoped_release release;
        int64_t n = 0;  // completion tokens placed so far
        for (int64_t r = 0; r < n_rows; ++r) {
            int64_t at = r * width;  // flat index of the next free place of row r
            for (int64_t s : plan[r]) {
                const int64_t first = s * group, p = prompt_lens[first];
                const int64_t prompt_start = first * row_width + prompt_width - p;
                for (int64_t t = 0; t < p; ++t, ++at) {
                    token[at] = prompt_start + t;
                    position[at] = t;
                    segment[at] = s;
                    branch[at] = 0;
                }
                const int64_t prompt_last = at - 1;
                for (int64_t k = 0; k < group; ++k) {
                    const int64_t b = first + k, c = completion_lens[b];
                    const int64_t completion_branch = shared ? k + 1 : 0;
                    for (int64_t t = 0; t < c; ++t, ++at, ++n) {
                        token[at] = b * row_width + prompt_width + t;
                        position[at] = p + t;
                        segment[at] = s;
                        branch[at] = completion_branch;
                        // token t is predicted by token t - 1; the first by the prompt's last token
                        state[n] = t == 0 ? prompt_last : at - 1;
                        target[n] = b * completion_width + t;
                    }
                }
            }
            // Row padding only after the row's segments: every place is written once (these arrays are large,
            // and their first write is what costs: it faults the fresh pages in).
            const int64_t row_end = (r + 1) * width;
            std::fill(token + at, token + row_end, int64_t{-1});
            std::fill(position + at, position + row_end, int64_t{0});
            std::fill(segment + at, segment + row_end, int64_t{-1});
            std::fill(branch + at, branch + row_end, int64_t{0});
        }
    }
    return py::make_tuple(token_index, position_ids, segment_ids, branch_ids, state_index, target_index);
}

// --------------------------------------------------------------------------------------------------
// anchor_groups
// --------------------------------------------------------------------------------------------------

// splitmix64 finalizer: mixes a group id into a hash so that (group, observation) keys spread evenly.
inline uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

// An observation string: a view of the UTF-8 buffer CPython caches on the str, plus the str's own hash,
// which CPython caches too, so a long observation is hashed at most once however often it is looked up.
struct Text {
    std::string_view utf8;
    Py_hash_t hash;
    bool operator==(const Text& other) const { return hash == other.hash && utf8 == other.utf8; }
};

inline uint64_t observation_hash(int64_t value) { return static_cast<uint64_t>(value); }
inline uint64_t observation_hash(const Text& text) { return static_cast<uint64_t>(text.hash); }

template <typename Obs>
struct AnchorKey {
    int64_t group;
    Obs observation;
    bool operator==(const AnchorKey& other) const { return group == other.group && observation == other.observation; }
};

template <typename Obs>
struct AnchorHash {
    size_t operator()(const AnchorKey<Obs>& key) const {
        return static_cast<size_t>(mix(mix(static_cast<uint64_t>(key.group)) ^ observation_hash(key.observation)));
    }
};

// Dense ids 0..K-1 in first-seen order of the key (group, observation).
template <typename Obs>
py::array_t<int64_t> dense_ids(const std::vector<int64_t>& groups, const std::vector<Obs>& observations) {
    std::unordered_map<AnchorKey<Obs>, int64_t, AnchorHash<Obs>> ids;
    ids.reserve(groups.size());
    std::vector<int64_t> out(groups.size());
    for (size_t i = 0; i < groups.size(); ++i) {
        out[i] = ids.try_emplace(AnchorKey<Obs>{groups[i], observations[i]}, static_cast<int64_t>(ids.size()))
                     .first->second;
    }
    return to_numpy(out);
}

// GiGPO's anchor states: steps of the same group (any trajectory, any step index) whose observations are
// identical share an anchor. Observations are strings (compared exactly; the hash only buckets them) or
// integers (precomputed hashes, compared as given).
py::array_t<int64_t> anchor_groups(py::object group_ids_obj, py::object observations) {
    const std::vector<int64_t> groups = to_int64(group_ids_obj, "group_ids");
    if (py::isinstance<py::str>(observations) || py::isinstance<py::bytes>(observations)) {
        throw py::type_error("observations must be a sequence of str (or an integer array of hashes), got one string");
    }
    const bool is_array = py::isinstance<py::array>(observations);
    const bool strings = is_array ? std::string("UO").find(py::array(observations).dtype().kind()) != std::string::npos
                                  : (py::isinstance<py::list>(observations) || py::isinstance<py::tuple>(observations)) &&
                                        py::len(observations) > 0 && py::isinstance<py::str>(observations[py::int_(0)]);
    if (!strings) {
        const std::vector<int64_t> hashes = to_int64(observations, "observations");
        check_same_size(groups.size(), hashes.size(), "group_ids", "observations");
        return dense_ids(groups, hashes);
    }
    // `items` keeps every str, and so every view, alive until we return.
    py::list items = is_array ? py::list(observations.attr("tolist")()) : py::list(observations);
    check_same_size(groups.size(), items.size(), "group_ids", "observations");
    std::vector<Text> texts(items.size());
    for (size_t i = 0; i < items.size(); ++i) {
        PyObject* item = items[i].ptr();
        if (!PyUnicode_Check(item)) {
            throw py::type_error("observations[" + std::to_string(i) + "] is " +
                                 std::string(Py_TYPE(item)->tp_name) + ", expected str (all str or all int)");
        }
        Py_ssize_t size = 0;
        const char* data = PyUnicode_AsUTF8AndSize(item, &size);
        if (data == nullptr) throw py::error_already_set();
        const Py_hash_t hash = PyObject_Hash(item);
        if (hash == -1) throw py::error_already_set();
        texts[i] = Text{std::string_view(data, static_cast<size_t>(size)), hash};
    }
    return dense_ids(groups, texts);
}

}  // namespace

PYBIND11_MODULE(_planner, m) {
    m.doc() = "Host-side planner (C++): micro-batch plans, packing indices, packed layouts, GiGPO anchor groups";
    m.def("plan_microbatches", &plan_microbatches, py::arg("lengths"), py::arg("token_budget"),
          py::arg("method") = "karmarkar_karp", py::arg("group_ids") = py::none());
    m.def("pack", &pack, py::arg("lengths"), py::arg("microbatch"), py::arg("padded_len") = -1,
          py::arg("padding_side") = "right");
    m.def("pack_layout", &pack_layout, py::arg("prompt_lens"), py::arg("completion_lens"), py::arg("prompt_width"),
          py::arg("completion_width"), py::arg("group_size") = py::none(), py::arg("token_budget") = py::none());
    m.def("anchor_groups", &anchor_groups, py::arg("group_ids"), py::arg("observations"));
}
