// Parsing of tokenizer.json into a Tokenizer (see tokenizer.h for what is accepted).
#include <array>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "model/internal/tokenizer_added_tokens.h"
#include "model/internal/tokenizer_bpe.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"
#include "services/status_macros.h"

namespace v4serve::model {

using Json = nlohmann::json;

namespace {

// The pre-tokenizer patterns of DeepSeek V3/V4 (and of tokenizers trained by
// tools/tokenizer/train_tokenizer.py), which internal/tokenizer_pretokenizer.cc implements by hand.
const char* const kDeepSeekSplitPatterns[3] = {
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| "
     "?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
};

// GPT-2's byte-to-character map used by ByteLevel: printable bytes map to themselves, the others to
// U+0100 onwards in byte order.
std::array<char32_t, 256> ByteToChar() {
  std::array<char32_t, 256> map{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    map[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return map;
}

void AppendUtf8(char32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Lenient field readers: a missing field or one of another type reads as `def` (nlohmann's value()
// would throw on a type mismatch).
std::string StrField(const Json& j, const char* key, const char* def = "") {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string(def);
}
bool BoolField(const Json& j, const char* key, bool def) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : def;
}

bool IsNullOr(const Json& j, const char* key, const Json& value) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() || *it == value;
}

absl::Status CheckNormalizer(const Json& root) {
  auto it = root.find("normalizer");
  if (it == root.end() || it->is_null()) return absl::OkStatus();
  if (it->is_object() && StrField(*it, "type") == "Sequence") {
    auto list = it->find("normalizers");
    if (list != it->end() && list->is_array() && list->empty()) return absl::OkStatus();
  }
  return absl::UnimplementedError(
      absl::StrCat("normalizer: only null or an empty Sequence is supported, got ", it->dump()));
}

absl::Status CheckPreTokenizer(const Json& root) {
  auto it = root.find("pre_tokenizer");
  absl::Status unsupported = absl::UnimplementedError(
      "pre_tokenizer: only DeepSeek V3/V4's Sequence of three Isolated Splits and ByteLevel(use_regex=false) "
      "is supported");
  if (it == root.end() || !it->is_object() || StrField(*it, "type") != "Sequence") return unsupported;
  auto list = it->find("pretokenizers");
  if (list == it->end() || !list->is_array() || list->size() != 4) return unsupported;
  for (int i = 0; i < 3; ++i) {
    const Json& split = (*list)[i];
    if (!split.is_object() || StrField(split, "type") != "Split" ||
        StrField(split, "behavior") != "Isolated" || !IsNullOr(split, "invert", false)) {
      return unsupported;
    }
    auto pattern = split.find("pattern");
    if (pattern == split.end() || !pattern->is_object() || !pattern->contains("Regex") ||
        (*pattern)["Regex"] != kDeepSeekSplitPatterns[i]) {
      return absl::UnimplementedError(absl::StrCat(
          "pre_tokenizer.pretokenizers[", i,
          "].pattern: not DeepSeek's pattern: ", pattern == split.end() ? "missing" : pattern->dump()));
    }
  }
  const Json& byte_level = (*list)[3];
  if (!byte_level.is_object() || StrField(byte_level, "type") != "ByteLevel" ||
      !IsNullOr(byte_level, "use_regex", false) || !IsNullOr(byte_level, "add_prefix_space", false)) {
    return unsupported;
  }
  return absl::OkStatus();
}

absl::Status CheckDecoder(const Json& root) {
  auto it = root.find("decoder");
  if (it == root.end() || it->is_null() || (it->is_object() && StrField(*it, "type") == "ByteLevel")) {
    return absl::OkStatus();
  }
  return absl::UnimplementedError(absl::StrCat("decoder: only ByteLevel is supported, got ", it->dump()));
}

absl::Status CheckBpeOptions(const Json& model) {
  if (model.contains("type") && model["type"] != "BPE") {
    return absl::UnimplementedError(
        absl::StrCat("model.type: only BPE is supported, got ", model["type"].dump()));
  }
  if (!IsNullOr(model, "dropout", Json(0.0)) && !IsNullOr(model, "dropout", Json(0))) {
    return absl::UnimplementedError("model.dropout: BPE dropout is not supported");
  }
  if (!IsNullOr(model, "byte_fallback", false)) {
    return absl::UnimplementedError("model.byte_fallback: not supported (byte-level BPE needs none)");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (!IsNullOr(model, key, ""))
      return absl::UnimplementedError(absl::StrCat("model.", key, ": not supported"));
  }
  return absl::OkStatus();
}

}  // namespace

// Friend of Tokenizer that fills its fields.
class TokenizerLoader {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(std::string_view json_text);

 private:
  static absl::Status LoadModel(const Json& model, Tokenizer& tok);
  static absl::Status LoadAddedTokens(const Json& root, Tokenizer& tok);
  static void SetToken(Tokenizer& tok, int32_t id, const std::string& spelling, bool special);
};

void TokenizerLoader::SetToken(Tokenizer& tok, int32_t id, const std::string& spelling, bool special) {
  static const std::array<char32_t, 256> kByteToChar = ByteToChar();
  static const absl::flat_hash_map<std::string, unsigned char> kCharToByte = [] {
    absl::flat_hash_map<std::string, unsigned char> map;
    for (int b = 0; b < 256; ++b) {
      std::string s;
      AppendUtf8(kByteToChar[b], s);
      map[s] = static_cast<unsigned char>(b);
    }
    return map;
  }();
  if (static_cast<size_t>(id) >= tok.token_bytes_.size()) {
    tok.token_bytes_.resize(id + 1);
    tok.id_flags_.resize(id + 1, 0);
  }
  // HF's ByteLevel decoder: a token whose every character is a byte-level character decodes to those
  // bytes; any other token decodes to its own UTF-8 spelling.
  std::string bytes;
  bool all_mapped = true;
  for (size_t pos = 0; pos < spelling.size() && all_mapped;) {
    size_t len = 1;
    const auto b0 = static_cast<unsigned char>(spelling[pos]);
    if (b0 >= 0xF0) {
      len = 4;
    } else if (b0 >= 0xE0) {
      len = 3;
    } else if (b0 >= 0xC0) {
      len = 2;
    }
    auto it = kCharToByte.find(spelling.substr(pos, len));
    if (it == kCharToByte.end()) {
      all_mapped = false;
    } else {
      bytes += static_cast<char>(it->second);
    }
    pos += len;
  }
  tok.token_bytes_[id] = all_mapped ? bytes : spelling;
  tok.id_flags_[id] = 1 | (special ? 2 : 0);
  tok.token_to_id_[spelling] = id;
}

absl::Status TokenizerLoader::LoadModel(const Json& model, Tokenizer& tok) {
  RETURN_IF_ERROR(CheckBpeOptions(model));
  auto vocab_it = model.find("vocab");
  if (vocab_it == model.end() || !vocab_it->is_object()) {
    return absl::InvalidArgumentError("model.vocab: missing or not an object");
  }
  for (const auto& [spelling, id] : vocab_it->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > (1 << 28)) {
      return absl::InvalidArgumentError(absl::StrCat("model.vocab[\"", spelling, "\"]: not a valid id"));
    }
    SetToken(tok, static_cast<int32_t>(id.get<int64_t>()), spelling, /*special=*/false);
  }
  auto vocab_id = [&](const std::string& s) -> int32_t {
    auto it = vocab_it->find(s);
    return it == vocab_it->end() ? -1 : static_cast<int32_t>(it->get<int64_t>());
  };
  static const std::array<char32_t, 256> kByteToChar = ByteToChar();
  std::array<int32_t, 256> byte_ids{};
  for (int b = 0; b < 256; ++b) {
    std::string s;
    AppendUtf8(kByteToChar[b], s);
    byte_ids[b] = vocab_id(s);
    if (byte_ids[b] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("model.vocab: lacks the byte-level token of byte ", b));
    }
  }
  auto merges_it = model.find("merges");
  if (merges_it == model.end() || !merges_it->is_array()) {
    return absl::InvalidArgumentError("model.merges: missing or not an array");
  }
  absl::flat_hash_map<uint64_t, internal::BpeMerger::Merge> merges;
  merges.reserve(merges_it->size());
  for (size_t i = 0; i < merges_it->size(); ++i) {
    const Json& m = (*merges_it)[i];
    std::string left, right;
    if (m.is_string()) {  // "left right" (older files, including DeepSeek's)
      const std::string& s = m.get_ref<const std::string&>();
      const size_t space = s.find(' ');
      if (space == std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat("model.merges[", i, "]: expected \"left right\""));
      }
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      return absl::InvalidArgumentError(absl::StrCat("model.merges[", i, "]: expected a string or a pair"));
    }
    const int32_t left_id = vocab_id(left), right_id = vocab_id(right), merged_id = vocab_id(left + right);
    if (left_id < 0 || right_id < 0 || merged_id < 0) {
      return absl::InvalidArgumentError(absl::StrCat("model.merges[", i, "]: token not in vocab"));
    }
    merges.insert_or_assign(internal::BpeMerger::PairKey(left_id, right_id),
                            internal::BpeMerger::Merge{static_cast<int32_t>(i), merged_id});
  }
  absl::flat_hash_map<std::string, int32_t> whole_pieces;
  if (BoolField(model, "ignore_merges", false)) {
    for (const auto& [spelling, id] : vocab_it->items()) {
      whole_pieces[tok.token_bytes_[id.get<int64_t>()]] = static_cast<int32_t>(id.get<int64_t>());
    }
  }
  tok.bpe_ = std::make_unique<internal::BpeMerger>(byte_ids, std::move(merges), std::move(whole_pieces));
  return absl::OkStatus();
}

absl::Status TokenizerLoader::LoadAddedTokens(const Json& root, Tokenizer& tok) {
  std::vector<std::pair<std::string, int32_t>> normalized, non_normalized;
  auto it = root.find("added_tokens");
  if (it != root.end() && !it->is_null()) {
    if (!it->is_array()) return absl::InvalidArgumentError("added_tokens: not an array");
    for (size_t i = 0; i < it->size(); ++i) {
      const Json& t = (*it)[i];
      const std::string where = absl::StrCat("added_tokens[", i, "]");
      if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() || t["id"].get<int64_t>() < 0 ||
          t["id"].get<int64_t>() > (1 << 28) || !t.contains("content") || !t["content"].is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": needs an integer id and a string content"));
      }
      for (const char* flag : {"lstrip", "rstrip", "single_word"}) {
        if (!IsNullOr(t, flag, false)) {
          return absl::UnimplementedError(absl::StrCat(where, ".", flag, ": only false is supported"));
        }
      }
      Tokenizer::AddedToken added{static_cast<int32_t>(t["id"].get<int64_t>()),
                                  t["content"].get<std::string>(), BoolField(t, "special", false),
                                  BoolField(t, "normalized", true)};
      SetToken(tok, added.id, added.content, added.special);
      (added.normalized ? normalized : non_normalized).emplace_back(added.content, added.id);
      tok.added_tokens_.push_back(std::move(added));
    }
  }
  tok.normalized_matcher_ = std::make_unique<internal::AddedTokenMatcher>(normalized);
  tok.non_normalized_matcher_ = std::make_unique<internal::AddedTokenMatcher>(non_normalized);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerLoader::Load(std::string_view json_text) {
  const Json root = Json::parse(json_text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: not a JSON object");
  }
  RETURN_IF_ERROR(CheckNormalizer(root));
  RETURN_IF_ERROR(CheckPreTokenizer(root));
  RETURN_IF_ERROR(CheckDecoder(root));
  auto model = root.find("model");
  if (model == root.end() || !model->is_object()) return absl::InvalidArgumentError("model: missing");
  std::unique_ptr<Tokenizer> tok(new Tokenizer());
  RETURN_IF_ERROR(LoadModel(*model, *tok));
  RETURN_IF_ERROR(LoadAddedTokens(root, *tok));
  return tok;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::LoadFromJson(std::string_view json_text) {
  return TokenizerLoader::Load(json_text);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::LoadFromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read tokenizer file ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  auto tok = TokenizerLoader::Load(buffer.str());
  if (!tok.ok()) return absl::Status(tok.status().code(), absl::StrCat(path, ": ", tok.status().message()));
  return tok;
}

}  // namespace v4serve::model
