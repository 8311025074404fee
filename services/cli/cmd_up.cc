// `v4serve up`: the all-in-one local cluster. Starts kvstore, a prefill worker, a decode worker and the
// router as child processes of this binary on loopback, waits until each serves, prints how to use it, and
// stops them all (router first, so in-flight requests drain) on SIGTERM/SIGINT or when any of them dies.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "services/child_process.h"
#include "services/cli/common.h"
#include "services/cli/subcommands.h"
#include "services/grpc_server.h"
#include "services/server_process.h"
#include "services/status_macros.h"

namespace v4serve::cli {
namespace {

using services::ChildProcess;

namespace fs = std::filesystem;

struct UpOptions {
  std::string model_dir = V4SERVE_DEFAULT_MODEL_DIR;
  std::string host = "127.0.0.1";
  int http_port = 8080;
  int grpc_port = 50051;
  std::string data_dir;
  std::string ready_file;
  absl::Duration start_timeout = absl::Seconds(120);
  absl::Duration drain_timeout = absl::Seconds(30);
  bool colocated = false;                  // No prefill worker: the decode worker prefills.
  std::vector<std::string> decode_flags;   // Extra flags for the decode worker.
  std::vector<std::string> kvstore_flags;  // Extra flags for the kvstore.
  services::LogOptions log;
};

// A started child and the ports from its ready file.
struct Role {
  std::unique_ptr<ChildProcess> process;
  nlohmann::json ready;
};

absl::StatusOr<Role> StartRole(const std::string& name, std::vector<std::string> argv,
                               const fs::path& run_dir, absl::Duration timeout,
                               services::ShutdownSignal* shutdown) {
  fs::path ready = run_dir / (name + ".json");
  argv.push_back("--ready_file=" + ready.string());
  ASSIGN_OR_RETURN(std::unique_ptr<ChildProcess> child, ChildProcess::Spawn(name, argv));
  absl::Time deadline = absl::Now() + timeout;
  while (true) {
    if (std::optional<int> code = child->Poll()) {
      return absl::UnavailableError(
          absl::StrCat(name, " exited with status ", *code, " while starting (see its log above)"));
    }
    std::error_code ec;
    if (fs::exists(ready, ec)) {
      absl::StatusOr<std::string> text = services::ReadFileToString(ready.string());
      if (text.ok()) {
        nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
        if (!j.is_discarded()) return Role{std::move(child), std::move(j)};
      }
    }
    if (absl::Now() > deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat(name, " did not start within ", absl::FormatDuration(timeout)));
    }
    if (!shutdown->WaitUntil(absl::Now() + absl::Milliseconds(50)).empty()) {
      return absl::CancelledError("interrupted while starting");
    }
  }
}

std::vector<std::string> CommonFlags(const UpOptions& o) {
  return {"--host=" + o.host, "--log_level=" + o.log.level, "--log_format=" + o.log.format,
          "--drain_timeout=" + absl::FormatDuration(o.drain_timeout)};
}

void PrintBanner(const UpOptions& o, int http_port, int grpc_port, bool have_model) {
  // The router serves the model under its directory's name (router --served_model_name).
  std::string model_id = fs::path(o.model_dir).lexically_normal().filename().string();
  std::string base = absl::StrCat("http://", o.host, ":", http_port);
  std::printf("\nv4serve is up: %s  (gRPC Inference on %s:%d)\n", base.c_str(), o.host.c_str(), grpc_port);
  if (!have_model) {
    std::printf(
        "\nNo model is loaded: no config.json in '%s'.\n"
        "The router answers %s/healthz; /readyz and completions answer 503 until a model is served.\n"
        "Point --model at a V4 checkpoint directory to serve it.\n\n",
        o.model_dir.c_str(), base.c_str());
  } else {
    std::printf(
        "\nTry it:\n"
        "  curl %s/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        "    -d '{\"model\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":\"What is "
        "12+30?\"}]}'\n\n"
        "  python3 -c \"from openai import OpenAI; c=OpenAI(base_url='%s/v1', api_key='none'); "
        "print(c.chat.completions.create(model='%s', messages=[{'role':'user','content':'What is "
        "12+30?'}])"
        ".choices[0].message.content)\"\n\n",
        base.c_str(), model_id.c_str(), base.c_str(), model_id.c_str());
  }
  std::printf("Stop with Ctrl-C (drains in-flight requests).\n");
  std::fflush(stdout);
}

absl::Status RunUp(const Context& ctx, const UpOptions& o) {
  std::error_code ec;
  bool have_model = fs::is_regular_file(fs::path(o.model_dir) / "config.json", ec);
  std::string tmpl = (fs::temp_directory_path() / "v4serve-up-XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) return absl::InternalError("cannot create a run directory in /tmp");
  fs::path run_dir = tmpl;
  std::string data_dir = o.data_dir.empty() ? (run_dir / "data").string() : o.data_dir;

  std::vector<Role> roles;  // started in dependency order, stopped in reverse
  absl::Status status = [&]() -> absl::Status {
    std::vector<std::string> decode_workers, prefill_workers;
    nlohmann::json workers = nlohmann::json::object();  // role -> {grpc_port, metrics_port}, for scripts
    if (have_model) {
      std::vector<std::string> kv = {ctx.self_exe, "kvstore", "--grpc_port=0",
                                     "--db_path=" + data_dir + "/kvstore"};
      for (auto& f : CommonFlags(o)) kv.push_back(f);
      kv.insert(kv.end(), o.kvstore_flags.begin(), o.kvstore_flags.end());
      ASSIGN_OR_RETURN(Role kvstore, StartRole("kvstore", kv, run_dir, o.start_timeout, ctx.shutdown));
      // The workers share prefix KV through it (docs/KV_STORE.md).
      const std::string kvstore_addr = absl::StrCat(o.host, ":", kvstore.ready["grpc_port"].get<int>());
      roles.push_back(std::move(kvstore));
      // Disaggregated: the router sends each request to the decode worker naming the prefill worker,
      // which computes the prompt and pushes its KV to the decode worker over gRPC. The decode worker's
      // engine (its local prefills: fallback and Inference.Generate) reuses prefixes through the kvstore.
      for (std::string role : {"prefill", "decode"}) {
        if (role == "prefill" && o.colocated) continue;
        std::vector<std::string> argv = {ctx.self_exe,       role,
                                         "--grpc_port=0",    "--model=" + o.model_dir,
                                         "--metrics_port=0", "--metrics_host=" + o.host};
        if (role == "decode") {
          argv.push_back("--advertise_host=" + o.host);
          argv.push_back("--kvstore=" + kvstore_addr);
          argv.insert(argv.end(), o.decode_flags.begin(), o.decode_flags.end());
        }
        for (auto& f : CommonFlags(o)) argv.push_back(f);
        ASSIGN_OR_RETURN(Role r, StartRole(role, argv, run_dir, o.start_timeout, ctx.shutdown));
        std::string addr = absl::StrCat(o.host, ":", r.ready["grpc_port"].get<int>());
        (role == "prefill" ? prefill_workers : decode_workers).push_back(addr);
        workers[role] = {{"grpc_port", r.ready["grpc_port"]}, {"metrics_port", r.ready["metrics_port"]}};
        roles.push_back(std::move(r));
      }
    }
    std::vector<std::string> argv = {ctx.self_exe, "router", absl::StrCat("--http_host=", o.host),
                                     absl::StrCat("--http_port=", o.http_port),
                                     absl::StrCat("--grpc_port=", o.grpc_port)};
    if (have_model) argv.push_back("--model=" + o.model_dir);
    if (!prefill_workers.empty()) argv.push_back("--prefill_workers=" + absl::StrJoin(prefill_workers, ","));
    if (!decode_workers.empty()) argv.push_back("--decode_workers=" + absl::StrJoin(decode_workers, ","));
    for (auto& f : CommonFlags(o)) argv.push_back(f);
    ASSIGN_OR_RETURN(Role router, StartRole("router", argv, run_dir, o.start_timeout, ctx.shutdown));
    int http_port = router.ready["http_port"].get<int>();
    int grpc_port = router.ready["grpc_port"].get<int>();
    nlohmann::json ready = {{"pid", getpid()},
                            {"http_port", http_port},
                            {"grpc_port", grpc_port},
                            {"model_loaded", have_model},
                            {"workers", workers}};
    roles.push_back(std::move(router));
    PrintBanner(o, http_port, grpc_port, have_model);
    if (!o.ready_file.empty())
      RETURN_IF_ERROR(services::WriteFileAtomically(o.ready_file, ready.dump() + "\n"));
    // Supervise: any child exiting on its own ends the cluster.
    while (ctx.shutdown->WaitUntil(absl::Now() + absl::Milliseconds(200)).empty()) {
      for (Role& r : roles) {
        if (std::optional<int> code = r.process->Poll()) {
          return absl::UnavailableError(
              absl::StrCat(r.process->name(), " exited unexpectedly with status ", *code));
        }
      }
    }
    return absl::OkStatus();
  }();
  absl::Time deadline = absl::Now() + o.drain_timeout + absl::Seconds(5);
  for (auto it = roles.rbegin(); it != roles.rend(); ++it) {
    int code = it->process->Stop(deadline);
    if (code != 0 && status.ok()) {
      status = absl::InternalError(
          absl::StrCat(it->process->name(), " exited with status ", code, " while stopping"));
    }
  }
  if (!o.ready_file.empty()) fs::remove(o.ready_file, ec);
  fs::remove_all(run_dir, ec);
  return status;
}

}  // namespace

int RunUpCommand(const Context& ctx, const std::vector<std::string>& args) {
  UpOptions o;
  services::FlagSet flags(
      "v4serve up",
      "The all-in-one local cluster: kvstore + prefill + decode + router on this machine, "
      "serving the embedded tiny model by default.");
  flags.Add("model", &o.model_dir, "Checkpoint directory to serve.");
  flags.Add("host", &o.host, "Address every role listens on.");
  flags.Add("http_port", &o.http_port, "Router HTTP port (OpenAI API); 0 picks one.");
  flags.Add("grpc_port", &o.grpc_port, "Router gRPC port (Inference); 0 picks one.");
  flags.Add("data_dir", &o.data_dir, "Where the kvstore keeps its RocksDB (default: a temporary directory).");
  flags.Add("ready_file", &o.ready_file,
            "Write {\"http_port\",\"grpc_port\",...} here once everything serves.");
  flags.Add("start_timeout", &o.start_timeout, "How long each role may take to start.");
  flags.Add("drain_timeout", &o.drain_timeout, "On SIGTERM, how long in-flight requests may take.");
  flags.Add("colocated", &o.colocated, "Start no prefill worker: the decode worker prefills every prompt.");
  flags.Add("decode_flags", &o.decode_flags,
            "Extra flags for the decode worker, comma-separated (e.g. --swa_policy=zero,--kv_blocks=64).");
  flags.Add("kvstore_flags", &o.kvstore_flags,
            "Extra flags for the kvstore, comma-separated (e.g. --host_mb=1).");
  services::AddLogFlags(flags, &o.log);
  if (std::optional<int> code = ParseFlags(flags, args)) return *code;
  if (!SetUpLogging(o.log, "up")) return 2;
  return ExitCode(RunUp(ctx, o), "up");
}

}  // namespace v4serve::cli
