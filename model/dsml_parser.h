// DsmlParser: splits DeepSeek-V4 output text, as it streams, into reasoning, content and tool calls.
//
// Follows the reference parse_message_from_completion_text() of encoding_dsv4.py: in thinking mode the
// text up to "</think>" is reasoning; then content, until an optional DSML block
//   "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"k\" string=\"true\">v
//    </｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
// whose invokes become OpenAI tool calls with JSON-object arguments, built exactly as the reference's
// decode_dsml_to_arguments (string="true" values JSON-quoted, others inserted as written). The text
// "<｜end▁of▁sentence｜>", if the caller decodes it, ends the message.
//
// Unlike the reference, which raises on malformed output, the parser never fails: a DSML block that does
// not parse (or never closes) is returned as plain content, so the user sees what the model wrote. Text
// that might be the start of a marker is held back until it is decided, so deltas never contain half a
// marker; input fed as whole UTF-8 characters yields deltas of whole characters.
//
// Thread-safety: externally synchronized (one parser per generation stream). Deltas are returned by value.
#ifndef V4SERVE_MODEL_DSML_PARSER_H_
#define V4SERVE_MODEL_DSML_PARSER_H_

#include <string>
#include <string_view>
#include <vector>

namespace v4serve::model {

struct DsmlToolCall {
  std::string name;
  std::string arguments;  // a JSON object, e.g. {"city": "Paris", "days": 3}
};

struct ChatDelta {
  enum class Kind { kReasoning, kContent, kToolCall };
  Kind kind;
  std::string text;          // kReasoning / kContent
  DsmlToolCall tool_call;    // kToolCall
  int tool_call_index = -1;  // kToolCall: 0-based position among this message's tool calls
};

// A whole parsed assistant message.
struct ParsedAssistantMessage {
  std::string reasoning_content;
  std::string content;
  std::vector<DsmlToolCall> tool_calls;
};

class DsmlParser {
 public:
  struct Options {
    // True when the prompt ended with "<think>" (ThinkingMode::kThinking): output starts as reasoning.
    bool thinking = false;
    // False where the request declared no tools (or tool_choice "none"): a DSML block is then plain
    // content, as the model wrote it, never a tool call the client did not offer.
    bool tool_calls = true;
  };

  explicit DsmlParser(Options options);

  // Feeds the next piece of decoded text; returns the deltas it completed, adjacent text of one kind
  // merged. Text after the end-of-sentence marker is ignored.
  std::vector<ChatDelta> Push(std::string_view text);
  // Ends the stream: flushes held-back text (an unclosed DSML block becomes content).
  std::vector<ChatDelta> Finish();

  // Whether "<｜end▁of▁sentence｜>" was seen or Finish() was called; later Push() calls return nothing.
  bool finished() const { return state_ == State::kDone; }

  // Push(text) + Finish() collected into one message.
  static ParsedAssistantMessage ParseCompletion(std::string_view text, Options options);

 private:
  enum class State { kReasoning, kContent, kToolBlock, kDone };

  void Step(bool final, std::vector<ChatDelta>& out);
  void Emit(ChatDelta::Kind kind, std::string_view text, std::vector<ChatDelta>& out);

  State state_;
  bool tool_calls_;
  std::string buffer_;  // undecided text of the current state (for kToolBlock: the block after its marker)
  size_t block_scanned_ = 0;  // kToolBlock: bytes of buffer_ already searched for the closing tag
  int tool_calls_emitted_ = 0;
};

// Parses a complete DSML tool-call block, given the text after "\n\n<｜DSML｜tool_calls" up to and
// including "</｜DSML｜tool_calls>". Returns false when it is not valid DSML. Exposed for tests and fuzzing.
bool ParseDsmlToolCallBlock(std::string_view block, std::vector<DsmlToolCall>& calls);

}  // namespace v4serve::model

#endif  // V4SERVE_MODEL_DSML_PARSER_H_
