// Serves a KvEventHub as a gRPC server stream of v1::KvEvent (Worker.KvEvents): the snapshot first, then
// stored/evicted batches as the holder's prefix cache changes. Each stream has one thread that waits on
// its subscription; the stream ends when the client cancels, the server shuts down, or the hub closes.
#ifndef V4SERVE_KVSTORE_KV_EVENTS_STREAM_H_
#define V4SERVE_KVSTORE_KV_EVENTS_STREAM_H_

#include <string>

#include "grpcpp/grpcpp.h"
#include "kvstore/kv_events.h"
#include "v4serve/v1/kvstore.pb.h"

namespace v4serve::kvstore {

// The proto form of one batch from `hub`, naming `holder`.
v1::KvEvent ToKvEventProto(const KvEventHub& hub, const KvEventBatch& batch, const std::string& holder);

// A reactor for a Worker.KvEvents call. `hub` must outlive the call (the server's shutdown waits for it).
// A null hub answers UNIMPLEMENTED (a worker without a prefix cache).
grpc::ServerWriteReactor<v1::KvEvent>* StreamKvEvents(KvEventHub* hub, std::string holder);

}  // namespace v4serve::kvstore

#endif  // V4SERVE_KVSTORE_KV_EVENTS_STREAM_H_
