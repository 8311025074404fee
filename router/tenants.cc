#include "router/tenants.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"

namespace v4serve::router {
namespace {

absl::Status Bad(const std::string& file, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("--api_keys_file: ", file, ": ", what));
}

}  // namespace

TenantTicket& TenantTicket::operator=(TenantTicket&& other) noexcept {
  if (this != &other) {
    if (registry_ != nullptr) registry_->Release(tenant_);
    registry_ = std::exchange(other.registry_, nullptr);
    tenant_ = std::move(other.tenant_);
  }
  return *this;
}

TenantTicket::~TenantTicket() {
  if (registry_ != nullptr) registry_->Release(tenant_);
}

absl::StatusOr<std::unique_ptr<TenantRegistry>> TenantRegistry::Create(const std::string& keys_file,
                                                                       const TenantLimits& defaults,
                                                                       std::function<absl::Time()> now) {
  if (defaults.requests_per_minute < 0 || defaults.max_concurrent < 0) {
    return absl::InvalidArgumentError("tenant limits must be >= 0 (0 = unlimited)");
  }
  std::unique_ptr<TenantRegistry> r(new TenantRegistry(defaults, std::move(now)));
  if (keys_file.empty()) return r;
  std::ifstream in(keys_file);
  if (!in) return Bad(keys_file, "cannot be read");
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json doc = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return Bad(keys_file, "is not valid JSON");
  if (!doc.is_object() || !doc.contains("keys") || !doc["keys"].is_array() || doc["keys"].empty()) {
    return Bad(keys_file, "expected {\"keys\": [{\"key\": ..., \"tenant\": ...}, ...]} with at least one key");
  }
  for (size_t i = 0; i < doc["keys"].size(); ++i) {
    const nlohmann::json& e = doc["keys"][i];
    const std::string at = absl::StrCat("keys[", i, "]");
    if (!e.is_object()) return Bad(keys_file, at + " must be an object");
    if (!e.contains("key") || !e["key"].is_string() || e["key"].get<std::string>().size() < 8) {
      return Bad(keys_file, at + ".key must be a string of at least 8 characters");
    }
    if (!e.contains("tenant") || !e["tenant"].is_string() || e["tenant"].get<std::string>().empty()) {
      return Bad(keys_file, at + ".tenant must be a non-empty string");
    }
    Key k{e["tenant"].get<std::string>(), defaults};
    if (e.contains("requests_per_minute")) {
      if (!e["requests_per_minute"].is_number() || e["requests_per_minute"].get<double>() < 0) {
        return Bad(keys_file, at + ".requests_per_minute must be a number >= 0");
      }
      k.limits.requests_per_minute = e["requests_per_minute"].get<double>();
    }
    if (e.contains("max_concurrent")) {
      if (!e["max_concurrent"].is_number_integer() || e["max_concurrent"].get<int64_t>() < 0) {
        return Bad(keys_file, at + ".max_concurrent must be an integer >= 0");
      }
      k.limits.max_concurrent = e["max_concurrent"].get<int32_t>();
    }
    const std::string key = e["key"].get<std::string>();
    if (r->keys_.contains(key)) return Bad(keys_file, at + ".key appears twice");
    // Several keys of one tenant share its limits: the first key's limits stand, and a different value
    // on a later key is an error rather than a silent choice.
    auto [it, inserted] = r->limits_.emplace(k.tenant, k.limits);
    if (!inserted && (it->second.requests_per_minute != k.limits.requests_per_minute ||
                      it->second.max_concurrent != k.limits.max_concurrent)) {
      return Bad(keys_file, at + ": tenant '" + k.tenant + "' has different limits on another key");
    }
    r->keys_.emplace(key, std::move(k));
  }
  return r;
}

absl::StatusOr<std::string> TenantRegistry::Authenticate(absl::string_view authorization) const {
  if (keys_.empty()) return std::string();
  absl::string_view v = absl::StripAsciiWhitespace(authorization);
  if (v.empty()) {
    return absl::UnauthenticatedError(
        "missing API key: send it as 'Authorization: Bearer <key>' (this router has --api_keys_file)");
  }
  if (!absl::ConsumePrefix(&v, "Bearer ") && !absl::ConsumePrefix(&v, "bearer ")) {
    return absl::UnauthenticatedError("the Authorization header must be 'Bearer <key>'");
  }
  auto it = keys_.find(absl::StripAsciiWhitespace(v));
  if (it == keys_.end()) return absl::UnauthenticatedError("invalid API key");
  return it->second.tenant;
}

absl::StatusOr<TenantTicket> TenantRegistry::Admit(const std::string& tenant) {
  const absl::Time now = now_();
  absl::MutexLock l(&mu_);
  auto [it, fresh] = state_.try_emplace(tenant);
  State& s = it->second;
  if (fresh) {
    auto lim = limits_.find(tenant);
    s.limits = lim == limits_.end() ? defaults_ : lim->second;
    s.tokens = std::max(1.0, s.limits.requests_per_minute);
    s.refilled = now;
  }
  const std::string who = tenant.empty() ? "the default tenant" : absl::StrCat("tenant '", tenant, "'");
  if (s.limits.max_concurrent > 0 && s.in_flight >= s.limits.max_concurrent) {
    return absl::ResourceExhaustedError(absl::StrCat(who, " has ", s.in_flight,
                                                     " requests in flight, its limit; retry when one ends"));
  }
  if (s.limits.requests_per_minute > 0) {
    const double rate = s.limits.requests_per_minute / 60.0;  // per second
    const double cap = std::max(1.0, s.limits.requests_per_minute);
    s.tokens = std::min(cap, s.tokens + absl::ToDoubleSeconds(now - s.refilled) * rate);
    s.refilled = now;
    if (s.tokens < 1.0) {
      const double wait = std::ceil((1.0 - s.tokens) / rate);
      return absl::ResourceExhaustedError(absl::StrCat(who, " is over its limit of ",
                                                       s.limits.requests_per_minute,
                                                       " requests per minute; retry in ", wait, " s"));
    }
    s.tokens -= 1.0;
  }
  ++s.in_flight;
  TenantTicket t;
  t.registry_ = this;
  t.tenant_ = tenant;
  return t;
}

void TenantRegistry::Release(const std::string& tenant) {
  absl::MutexLock l(&mu_);
  auto it = state_.find(tenant);
  if (it != state_.end() && it->second.in_flight > 0) --it->second.in_flight;
}

}  // namespace v4serve::router
