#include "model/tokenizer_streaming.h"

#include "absl/strings/str_cat.h"
#include "model/internal/tokenizer_unicode.h"

namespace v4serve::model {

StreamingDecoder::StreamingDecoder(const Tokenizer& tokenizer, Options options)
    : tokenizer_(tokenizer), options_(options) {}

absl::StatusOr<std::string> StreamingDecoder::Push(TokenId id) {
  const std::string* bytes = tokenizer_.TokenBytes(id);
  if (bytes == nullptr) return absl::InvalidArgumentError(absl::StrCat("unknown token id ", id));
  if (options_.skip_special_tokens && tokenizer_.IsSpecial(id)) return std::string();
  return PushBytes(*bytes);
}

std::string StreamingDecoder::PushBytes(std::string_view bytes) {
  pending_.append(bytes);
  std::string out;
  size_t pos = 0;
  while (pos < pending_.size()) {
    const size_t valid = internal::ValidUtf8Prefix(std::string_view(pending_).substr(pos));
    out.append(pending_, pos, valid);
    pos += valid;
    if (pos == pending_.size()) break;
    const internal::Utf8Scan scan = internal::ScanUtf8(pending_, pos);
    if (scan.kind == internal::Utf8Scan::kTruncated) break;  // may still complete: hold it
    out.append("\xEF\xBF\xBD");
    pos += scan.length;
  }
  pending_.erase(0, pos);
  return out;
}

std::string StreamingDecoder::Finish() {
  std::string out = pending_.empty() ? "" : "\xEF\xBF\xBD";
  pending_.clear();
  return out;
}

}  // namespace v4serve::model
