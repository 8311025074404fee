#include "kvstore/kv_events.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <thread>

namespace v4serve::kvstore {
namespace {

using ::testing::UnorderedElementsAre;

TEST(KvEventHubTest, SnapshotFirstThenChangesInOrder) {
  KvEventHub hub(7, 128);
  hub.Stored(std::vector<BlockHash>{1, 2});
  auto sub = hub.Subscribe();
  KvEventBatch b;
  ASSERT_TRUE(sub->Next(&b, absl::ZeroDuration()));
  EXPECT_TRUE(b.snapshot);
  EXPECT_THAT(b.hashes, UnorderedElementsAre(1, 2));
  hub.Stored(std::vector<BlockHash>{2, 3});  // 2 is already held: only 3 is news
  hub.Evicted(std::vector<BlockHash>{1, 9});  // 9 was never held
  ASSERT_TRUE(sub->Next(&b, absl::ZeroDuration()));
  EXPECT_EQ(b.kind, KvEventBatch::Kind::kStored);
  EXPECT_FALSE(b.snapshot);
  EXPECT_THAT(b.hashes, UnorderedElementsAre(3));
  ASSERT_TRUE(sub->Next(&b, absl::ZeroDuration()));
  EXPECT_EQ(b.kind, KvEventBatch::Kind::kEvicted);
  EXPECT_THAT(b.hashes, UnorderedElementsAre(1));
  EXPECT_FALSE(sub->Next(&b, absl::Milliseconds(5))) << "nothing more";
  EXPECT_EQ(hub.held(), 2);
}

TEST(KvEventHubTest, ASlowSubscriberGetsAFreshSnapshotNotAnUnboundedBacklog) {
  KvEventHub hub(7, 128, /*max_pending=*/3);
  auto sub = hub.Subscribe();
  KvEventBatch b;
  ASSERT_TRUE(sub->Next(&b, absl::ZeroDuration()));  // empty snapshot
  for (BlockHash h = 1; h <= 10; ++h) hub.Stored(std::vector<BlockHash>{h});
  hub.Evicted(std::vector<BlockHash>{4});
  ASSERT_TRUE(sub->Next(&b, absl::ZeroDuration()));
  EXPECT_TRUE(b.snapshot);
  EXPECT_EQ(b.hashes.size(), 9u);
  EXPECT_FALSE(sub->Next(&b, absl::Milliseconds(1)));
}

TEST(KvEventHubTest, NextWakesOnPublishAndOnClose) {
  KvEventHub hub(7, 128);
  auto sub = hub.Subscribe();
  KvEventBatch b;
  ASSERT_TRUE(sub->Next(&b, absl::ZeroDuration()));
  std::thread t([&] {
    absl::SleepFor(absl::Milliseconds(20));
    hub.Stored(std::vector<BlockHash>{5});
  });
  ASSERT_TRUE(sub->Next(&b, absl::Seconds(10)));
  EXPECT_THAT(b.hashes, UnorderedElementsAre(5));
  t.join();
  std::thread c([&] {
    absl::SleepFor(absl::Milliseconds(20));
    hub.Close();
  });
  absl::Time start = absl::Now();
  EXPECT_FALSE(sub->Next(&b, absl::Seconds(10)));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  c.join();
}

}  // namespace
}  // namespace v4serve::kvstore
