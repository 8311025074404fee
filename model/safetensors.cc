#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/numeric_formats.h"
#include "nlohmann/json.hpp"
#include "services/status_macros.h"

namespace v4serve::model {
namespace {

using Json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100u << 20;  // Same cap as the reference implementation.

struct DTypeEntry {
  const char* name;
  DType dtype;
  int64_t size;
};
constexpr DTypeEntry kDTypes[] = {
    {"BOOL", DType::kBool, 1},      {"U8", DType::kU8, 1},          {"I8", DType::kI8, 1},
    {"I16", DType::kI16, 2},        {"I32", DType::kI32, 4},        {"I64", DType::kI64, 8},
    {"F16", DType::kF16, 2},        {"BF16", DType::kBF16, 2},      {"F32", DType::kF32, 4},
    {"F64", DType::kF64, 8},        {"F8_E4M3", DType::kF8E4M3, 1}, {"F8_E5M2", DType::kF8E5M2, 1},
    {"F8_E8M0", DType::kF8E8M0, 1},
};

std::string ShapeString(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

template <typename T>
T Load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

absl::Status ParseOneTensor(const std::string& name, const Json& v, uint64_t data_size, TensorInfo* t) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors tensor '", name, "': ", what));
  };
  if (!v.is_object()) return bad("entry is not an object");
  auto dt = v.find("dtype");
  if (dt == v.end() || !dt->is_string()) return bad("missing dtype");
  const std::string dname = dt->get<std::string>();
  int64_t esize = 0;
  for (const DTypeEntry& e : kDTypes) {
    if (dname == e.name) {
      t->dtype = e.dtype;
      esize = e.size;
    }
  }
  if (esize == 0) return bad(absl::StrCat("unknown dtype '", dname, "'"));
  auto sh = v.find("shape");
  if (sh == v.end() || !sh->is_array()) return bad("missing shape");
  uint64_t elements = 1;
  for (const Json& d : *sh) {
    if (!d.is_number_unsigned()) return bad("shape entries must be non-negative integers");
    const uint64_t dim = d.get<uint64_t>();
    if (dim > (uint64_t{1} << 48) || (dim != 0 && elements > (uint64_t{1} << 52) / dim))
      return bad("shape too large");
    elements *= dim;
    t->shape.push_back(static_cast<int64_t>(dim));
  }
  auto off = v.find("data_offsets");
  if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned()) {
    return bad("data_offsets must be [begin, end]");
  }
  t->begin = (*off)[0].get<uint64_t>();
  t->end = (*off)[1].get<uint64_t>();
  if (t->begin > t->end || t->end > data_size) {
    return bad(absl::StrCat("data_offsets [", t->begin, ", ", t->end, "] outside the data section of ",
                            data_size, " bytes (truncated file?)"));
  }
  if (t->end - t->begin != elements * static_cast<uint64_t>(esize)) {
    return bad(absl::StrCat("shape ", ShapeString(t->shape), " of ", dname, " needs ", elements * esize,
                            " bytes but data_offsets span ", t->end - t->begin));
  }
  t->name = name;
  return absl::OkStatus();
}

}  // namespace

std::string_view DTypeName(DType dtype) {
  for (const DTypeEntry& e : kDTypes) {
    if (e.dtype == dtype) return e.name;
  }
  return "?";
}

int64_t DTypeSize(DType dtype) {
  for (const DTypeEntry& e : kDTypes) {
    if (e.dtype == dtype) return e.size;
  }
  return 0;
}

int64_t TensorInfo::elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(std::string_view header_json,
                                                               uint64_t data_size) {
  Json j = Json::parse(header_json.begin(), header_json.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("safetensors header is not valid JSON");
  if (!j.is_object()) return absl::InvalidArgumentError("safetensors header is not a JSON object");
  std::vector<TensorInfo> out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    TensorInfo t;
    RETURN_IF_ERROR(ParseOneTensor(it.key(), it.value(), data_size, &t));
    out.push_back(std::move(t));
  }
  std::vector<const TensorInfo*> by_offset;
  by_offset.reserve(out.size());
  for (const TensorInfo& t : out) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      return absl::InvalidArgumentError(absl::StrCat("safetensors tensors '", by_offset[i - 1]->name,
                                                     "' and '", by_offset[i]->name, "' overlap"));
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::InternalError(absl::StrCat("cannot stat ", path));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(path, ": ", size, " bytes is too short for a safetensors file"));
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return absl::InternalError(absl::StrCat("mmap ", path, ": ", std::strerror(errno)));
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_ = map;
  f->map_size_ = size;
  const uint8_t* bytes = static_cast<const uint8_t*>(map);
  const uint64_t n = Load<uint64_t>(bytes);
  if (n > kMaxHeaderBytes || n > size - 8) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", n, " does not fit in a file of ", size,
                                            " bytes (truncated or not safetensors)"));
  }
  f->data_ = bytes + 8 + n;
  absl::StatusOr<std::vector<TensorInfo>> tensors =
      ParseSafetensorsHeader(std::string_view(reinterpret_cast<const char*>(bytes + 8), n), size - 8 - n);
  if (!tensors.ok()) return absl::DataLossError(absl::StrCat(path, ": ", tensors.status().message()));
  f->tensors_ = *std::move(tensors);
  for (size_t i = 0; i < f->tensors_.size(); ++i) f->index_[f->tensors_[i].name] = i;
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

const TensorInfo* SafetensorsFile::Find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  std::unique_ptr<Checkpoint> c(new Checkpoint());
  std::vector<std::string> shards;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  std::error_code ec;
  Json index;
  if (fs::exists(index_path, ec)) {
    std::ifstream in(index_path);
    std::stringstream ss;
    ss << in.rdbuf();
    index = Json::parse(ss.str(), nullptr, false);
    if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object()) {
      return absl::DataLossError(
          absl::StrCat(index_path.string(), ": not an index with a weight_map object"));
    }
    for (const auto& [name, shard] : index["weight_map"].items()) {
      if (!shard.is_string())
        return absl::DataLossError(absl::StrCat(index_path.string(), ": bad shard for ", name));
      const std::string s = shard.get<std::string>();
      if (s.find('/') != std::string::npos) {
        return absl::DataLossError(
            absl::StrCat(index_path.string(), ": shard name '", s, "' leaves the directory"));
      }
      if (std::find(shards.begin(), shards.end(), s) == shards.end()) shards.push_back(s);
    }
  } else {
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      if (e.path().extension() == ".safetensors") shards.push_back(e.path().filename().string());
    }
    if (ec) return absl::NotFoundError(absl::StrCat("cannot list ", dir, ": ", ec.message()));
    std::sort(shards.begin(), shards.end());
  }
  if (shards.empty()) return absl::NotFoundError(absl::StrCat(dir, ": no .safetensors files"));
  for (const std::string& s : shards) {
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::Open((fs::path(dir) / s).string()));
    for (const TensorInfo& t : f->tensors()) {
      auto [it, inserted] = c->where_.emplace(t.name, f.get());
      if (!inserted) {
        return absl::DataLossError(
            absl::StrCat("tensor '", t.name, "' appears in both ", it->second->path(), " and ", f->path()));
      }
    }
    c->files_.push_back(std::move(f));
  }
  if (!index.is_null()) {
    for (const auto& [name, shard] : index["weight_map"].items()) {
      auto it = c->where_.find(name);
      if (it == c->where_.end()) {
        return absl::DataLossError(absl::StrCat("index lists '", name, "' in ", shard.get<std::string>(),
                                                " but that shard lacks it"));
      }
    }
  }
  return c;
}

bool Checkpoint::Contains(std::string_view name) const { return where_.find(name) != where_.end(); }

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, f] : where_) names.push_back(name);
  return names;
}

absl::StatusOr<TensorView> Checkpoint::Get(std::string_view name) const {
  auto it = where_.find(name);
  if (it == where_.end())
    return absl::NotFoundError(absl::StrCat("checkpoint has no tensor '", std::string(name), "'"));
  const TensorInfo* t = it->second->Find(name);
  return TensorView{t, it->second->data(*t), it->second->path()};
}

}  // namespace v4serve::model
