// Early-return helpers for absl::Status / absl::StatusOr<T>.
//
// Debian 12's Abseil (20220623) predates absl's own status macros, so v4serve defines them once here.
// Header-only (target v4serve_status) so that every module, model/ included, can use them without
// depending on the rest of services/.
#ifndef V4SERVE_SERVICES_STATUS_MACROS_H_
#define V4SERVE_SERVICES_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define V4_STATUS_CONCAT_INNER_(a, b) a##b
#define V4_STATUS_CONCAT_(a, b) V4_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status) and returns it from the enclosing function when not OK.
#define RETURN_IF_ERROR(expr)                \
  do {                                       \
    ::absl::Status v4_status_ = (expr);      \
    if (!v4_status_.ok()) return v4_status_; \
  } while (false)

// ASSIGN_OR_RETURN(lhs, expr): evaluates `expr` (an absl::StatusOr<T>); on error returns its status,
// otherwise move-assigns the value to `lhs`, which may be a declaration (`auto x`, `const T& y`).
#define ASSIGN_OR_RETURN(lhs, expr) \
  V4_ASSIGN_OR_RETURN_IMPL_(V4_STATUS_CONCAT_(v4_statusor_, __LINE__), lhs, expr)

#define V4_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr)     \
  auto statusor = (expr);                                  \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

#endif  // V4SERVE_SERVICES_STATUS_MACROS_H_
