#include "model/sequence_state.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "services/status_macros.h"

namespace v4serve::model {
namespace {

constexpr uint32_t kMagic = 0x56345353;  // "SS4V"
constexpr uint32_t kVersion = 1;

CompressorState NewCompressor(int64_t ratio, int64_t width) {
  CompressorState c;
  c.ratio = ratio;
  c.width = width;
  c.overlap = ratio == 4;
  const int64_t coff = c.overlap ? 2 : 1;
  c.kv.assign(static_cast<size_t>(ratio * coff * width), 0.0f);
  c.score.assign(c.kv.size(), 0.0f);
  if (c.overlap) {
    c.prev_kv.assign(c.kv.size(), 0.0f);
    c.prev_score.assign(c.kv.size(), 0.0f);
  }
  return c;
}

class Writer {
 public:
  void U64(uint64_t v) { out_.append(reinterpret_cast<const char*>(&v), 8); }
  void Floats(const std::vector<float>& v) {
    U64(v.size());
    if (!v.empty()) out_.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  }
  void Compressor(const CompressorState& c) {
    U64(static_cast<uint64_t>(c.filled));
    U64(c.has_prev ? 1 : 0);
    Floats(c.kv);
    Floats(c.score);
    Floats(c.prev_kv);
    Floats(c.prev_score);
  }
  std::string out_;
};

class Parser {
 public:
  explicit Parser(std::string_view b) : b_(b) {}
  absl::StatusOr<uint64_t> U64() {
    if (b_.size() < 8) return absl::DataLossError("sequence state truncated");
    uint64_t v;
    std::memcpy(&v, b_.data(), 8);
    b_.remove_prefix(8);
    return v;
  }
  absl::Status Floats(size_t want, std::vector<float>* v, const char* what) {
    ASSIGN_OR_RETURN(uint64_t n, U64());
    if (n != want) {
      return absl::DataLossError(
          absl::StrCat("sequence state: ", what, " has ", n, " values, expected ", want));
    }
    if (b_.size() < n * sizeof(float)) return absl::DataLossError("sequence state truncated");
    v->resize(n);
    if (n > 0) std::memcpy(v->data(), b_.data(), n * sizeof(float));  // data() may be null when empty.
    b_.remove_prefix(n * sizeof(float));
    return absl::OkStatus();
  }
  absl::Status Compressor(CompressorState* c) {
    ASSIGN_OR_RETURN(uint64_t filled, U64());
    ASSIGN_OR_RETURN(uint64_t has_prev, U64());
    if ((c->ratio > 0 && filled >= static_cast<uint64_t>(c->ratio)) || (c->ratio == 0 && filled != 0) ||
        has_prev > 1)
      return absl::DataLossError("bad compressor state");
    c->filled = static_cast<int64_t>(filled);
    c->has_prev = has_prev == 1;
    RETURN_IF_ERROR(Floats(c->kv.size(), &c->kv, "compressor kv"));
    RETURN_IF_ERROR(Floats(c->score.size(), &c->score, "compressor score"));
    RETURN_IF_ERROR(Floats(c->prev_kv.size(), &c->prev_kv, "compressor prev kv"));
    return Floats(c->prev_score.size(), &c->prev_score, "compressor prev score");
  }
  bool done() const { return b_.empty(); }

 private:
  std::string_view b_;
};

}  // namespace

SequenceState NewSequenceState(const ModelConfig& c) {
  SequenceState s;
  s.layers.resize(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    AttentionLayerState& ls = s.layers[l];
    ls.window.assign(static_cast<size_t>(c.sliding_window * c.head_dim), 0.0f);
    const int64_t ratio = c.compress_ratios[static_cast<size_t>(l)];
    if (ratio > 0) ls.compressor = NewCompressor(ratio, c.head_dim);
    if (ratio == 4) ls.indexer_compressor = NewCompressor(ratio, c.index_head_dim);
  }
  s.mtp_layers.resize(static_cast<size_t>(c.num_nextn_predict_layers));
  for (AttentionLayerState& ls : s.mtp_layers)
    ls.window.assign(static_cast<size_t>(c.sliding_window * c.head_dim), 0.0f);
  return s;
}

std::string SerializeSequenceState(const SequenceState& s) {
  Writer w;
  w.U64((uint64_t{kVersion} << 32) | kMagic);
  w.U64(static_cast<uint64_t>(s.position));
  w.U64(s.layers.size());
  for (const AttentionLayerState& l : s.layers) {
    w.Floats(l.window);
    w.Compressor(l.compressor);
    w.Compressor(l.indexer_compressor);
    w.Floats(l.entries);
    w.Floats(l.indexer_keys);
  }
  w.U64(static_cast<uint64_t>(s.mtp_position));
  w.U64(s.mtp_layers.size());
  for (const AttentionLayerState& l : s.mtp_layers) w.Floats(l.window);
  return std::move(w.out_);
}

absl::StatusOr<SequenceState> DeserializeSequenceState(const ModelConfig& c, std::string_view bytes) {
  Parser p(bytes);
  ASSIGN_OR_RETURN(uint64_t head, p.U64());
  if (head != ((uint64_t{kVersion} << 32) | kMagic)) return absl::DataLossError("not a v1 sequence state");
  SequenceState s = NewSequenceState(c);
  ASSIGN_OR_RETURN(uint64_t pos, p.U64());
  ASSIGN_OR_RETURN(uint64_t n_layers, p.U64());
  if (n_layers != s.layers.size()) return absl::DataLossError("sequence state layer count mismatch");
  s.position = static_cast<int64_t>(pos);
  for (size_t l = 0; l < s.layers.size(); ++l) {
    AttentionLayerState& ls = s.layers[l];
    RETURN_IF_ERROR(p.Floats(ls.window.size(), &ls.window, "window"));
    RETURN_IF_ERROR(p.Compressor(&ls.compressor));
    RETURN_IF_ERROR(p.Compressor(&ls.indexer_compressor));
    const int64_t ratio = c.compress_ratios[l];
    const size_t n = ratio > 0 ? static_cast<size_t>(s.position / ratio) : 0;
    RETURN_IF_ERROR(p.Floats(n * static_cast<size_t>(c.head_dim), &ls.entries, "entries"));
    RETURN_IF_ERROR(p.Floats(ratio == 4 ? n * static_cast<size_t>(c.index_head_dim) : 0, &ls.indexer_keys,
                             "indexer keys"));
  }
  ASSIGN_OR_RETURN(uint64_t mtp_pos, p.U64());
  ASSIGN_OR_RETURN(uint64_t n_mtp, p.U64());
  if (n_mtp != s.mtp_layers.size()) return absl::DataLossError("sequence state MTP layer count mismatch");
  s.mtp_position = static_cast<int64_t>(mtp_pos);
  for (AttentionLayerState& ls : s.mtp_layers)
    RETURN_IF_ERROR(p.Floats(ls.window.size(), &ls.window, "MTP window"));
  if (!p.done()) return absl::DataLossError("trailing bytes after sequence state");
  return s;
}

}  // namespace v4serve::model
