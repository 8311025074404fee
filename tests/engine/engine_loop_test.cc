// EngineLoop from many threads: concurrent submits give reference tokens, a cancel from another thread
// ends its request, and destroying the loop with work in flight reports every sequence as cancelled.
// Completion is awaited on notifications, never by sleeping.
#include "engine/engine_loop.h"

#include <random>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "tests/engine/engine_test_util.h"

namespace v4serve::engine {
namespace {

using testing::RandomTokens;
using testing::ReferenceGreedy;
using testing::TinyModel;

struct Result {
  absl::Mutex mu;
  std::vector<int32_t> tokens;
  FinishReason finish = FinishReason::kNone;
  absl::Notification done;
  absl::Notification first_token;
};

EngineRequest Request(const std::string& id, std::vector<int32_t> prompt, int max_tokens, Result* r) {
  EngineRequest req;
  req.request_id = id;
  req.prompt = std::move(prompt);
  req.sampling.max_tokens = max_tokens;
  req.sampling.ignore_eos = true;
  req.on_output = [r](const SequenceOutput& o) {
    absl::MutexLock l(&r->mu);
    if (o.token) {
      r->tokens.push_back(o.token->id);
      if (!r->first_token.HasBeenNotified()) r->first_token.Notify();
    }
    if (o.finish != FinishReason::kNone) {
      r->finish = o.finish;
      r->done.Notify();
    }
  };
  return req;
}

std::unique_ptr<Engine> MakeEngine() {
  EngineOptions o;
  o.kv.num_blocks = 64;
  auto e = Engine::Create(&TinyModel(), o);
  EXPECT_TRUE(e.ok()) << e.status();
  return *std::move(e);
}

TEST(EngineLoopTest, ConcurrentSubmittersGetReferenceTokensAndCancelWorks) {
  std::mt19937 rng(17);
  std::vector<std::vector<int32_t>> prompts;
  prompts.reserve(8);
  for (int i = 0; i < 8; ++i) prompts.push_back(RandomTokens(&rng, 20 + static_cast<int64_t>(rng() % 100)));
  EngineLoop loop(MakeEngine(), nullptr);
  std::vector<Result> results(8);
  std::vector<std::thread> threads;
  threads.reserve(8);
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back(
        [&, i] { loop.Submit(Request("r" + std::to_string(i), prompts[i], 6, &results[i])); });
  }
  Result cancelled;
  loop.Submit(Request("long", RandomTokens(&rng, 30), 3000, &cancelled));
  for (auto& t : threads) t.join();
  ASSERT_TRUE(cancelled.first_token.WaitForNotificationWithTimeout(absl::Seconds(120)));
  std::thread canceller([&] { loop.Cancel("long"); });
  canceller.join();
  ASSERT_TRUE(cancelled.done.WaitForNotificationWithTimeout(absl::Seconds(120)));
  EXPECT_EQ(cancelled.finish, FinishReason::kCancelled);
  for (int i = 0; i < 8; ++i) {
    ASSERT_TRUE(results[i].done.WaitForNotificationWithTimeout(absl::Seconds(300))) << i;
    absl::MutexLock l(&results[i].mu);
    EXPECT_EQ(results[i].tokens, ReferenceGreedy(prompts[i], 6)) << i;
    EXPECT_EQ(results[i].finish, FinishReason::kLength);
  }
  // Invalid requests come back through their callback.
  Result bad;
  loop.Submit(Request("bad", {}, 3, &bad));
  ASSERT_TRUE(bad.done.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_EQ(bad.finish, FinishReason::kError);
}

TEST(EngineLoopTest, DestructionCancelsWorkInFlight) {
  std::mt19937 rng(19);
  Result a, b;
  {
    EngineLoop loop(MakeEngine(), nullptr);
    loop.Submit(Request("a", RandomTokens(&rng, 40), 3000, &a));
    loop.Submit(Request("b", RandomTokens(&rng, 40), 3000, &b));
    ASSERT_TRUE(a.first_token.WaitForNotificationWithTimeout(absl::Seconds(120)));
  }
  EXPECT_TRUE(a.done.HasBeenNotified());
  EXPECT_TRUE(b.done.HasBeenNotified());
  EXPECT_EQ(a.finish, FinishReason::kCancelled);
  EXPECT_EQ(b.finish, FinishReason::kCancelled);
}

}  // namespace
}  // namespace v4serve::engine
