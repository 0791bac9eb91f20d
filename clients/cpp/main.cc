// Example C++ client for the Qwen3-ASR server: checks health, transcribes a WAV file with the unary
// Transcribe call, uploads the same audio as 20 ms PCM frames over TranscribeStream, prints JSON.
//
//   asr-client-cpp [--target localhost:50051] [--language English] [--token TOKEN] speech.wav
//
// Exit status: 0 on success, 1 for a usage or file error, 2 when a call fails (one line on stderr names the
// gRPC status code and the server's message).
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>

#include "grpc/health/v1/health.grpc.pb.h"
#include "qwenasr/v1/asr.grpc.pb.h"

namespace {

using qwenasr::v1::AsrService;
using qwenasr::v1::TranscribeResponse;

constexpr char kUsage[] = "usage: asr-client-cpp [--target host:port] [--language L] [--token TOKEN] FILE.wav";

// A usage, file or WAV error: exit status 1.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A failed call: exit status 2.
struct RpcError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Wav {
  std::string pcm;  // 16-bit little-endian samples, channels interleaved
  uint32_t sample_rate = 0;
  uint32_t channels = 0;
};

// The little-endian integer of `bytes` bytes at pos; the caller has checked that they are in data.
uint32_t le(const std::string& data, size_t pos, int bytes) {
  uint32_t value = 0;
  for (int i = bytes - 1; i >= 0; --i) value = (value << 8) | static_cast<uint8_t>(data.at(pos + i));
  return value;
}

// The last 14 bytes of the KSDATAFORMAT_SUBTYPE_* GUIDs; the first two are the format tag (1: PCM).
const std::string kSubtypeGuidTail("\x00\x00\x00\x00\x10\x00\x80\x00\x00\xAA\x00\x38\x9B\x71", 14);

// The 16-bit PCM samples of a WAV file with its sample rate and channel count. Every length is checked against
// the file's, so a short or malformed file is a UsageError. A data chunk that claims more bytes than the file has
// (as streamed recordings do) is read to the end of the file.
Wav ParseWav(const std::string& data) {
  if (data.size() < 12 || data.compare(0, 4, "RIFF") != 0 || data.compare(8, 4, "WAVE") != 0) {
    throw UsageError("not a RIFF/WAVE file");
  }
  Wav wav;
  bool have_fmt = false;
  for (uint64_t pos = 12; pos + 8 <= data.size();) {
    const std::string id = data.substr(pos, 4);
    const uint64_t size = le(data, pos + 4, 4);
    const uint64_t start = pos + 8, end = start + size;
    if (id == "fmt ") {
      if (end > data.size()) {
        throw UsageError("the fmt chunk (" + std::to_string(size) + " bytes) runs past the end of the file");
      }
      if (size < 16) throw UsageError("the fmt chunk is " + std::to_string(size) + " bytes, under 16");
      uint32_t tag = le(data, start, 2);
      const uint32_t bits = le(data, start + 14, 2);
      wav.channels = le(data, start + 2, 2);
      wav.sample_rate = le(data, start + 4, 4);
      if (tag == 0xFFFE) {  // WAVE_FORMAT_EXTENSIBLE: the real format is the sub-format GUID's first two bytes
        if (size < 40) {
          throw UsageError("the WAVE_FORMAT_EXTENSIBLE fmt chunk is " + std::to_string(size) + " bytes, under 40");
        }
        tag = data.compare(start + 26, 14, kSubtypeGuidTail) == 0 ? le(data, start + 24, 2) : 0;
      }
      if (tag != 1 || bits != 16) {
        char format[16];
        std::snprintf(format, sizeof format, "%#x", tag);
        throw UsageError(std::string("only 16-bit PCM WAV is supported (format ") + format + ", " +
                         std::to_string(bits) + " bits)");
      }
      if (wav.channels == 0 || wav.sample_rate == 0) {
        throw UsageError("the fmt chunk says " + std::to_string(wav.channels) + " channels at " +
                         std::to_string(wav.sample_rate) + " Hz");
      }
      have_fmt = true;
    } else if (id == "data") {
      if (!have_fmt) throw UsageError("the data chunk comes before the fmt chunk");
      uint64_t length = std::min<uint64_t>(end, data.size()) - start;
      length -= length % (wav.channels * 2ULL);
      wav.pcm = data.substr(start, length);
      return wav;
    }
    pos = end + size % 2;
  }
  throw UsageError(have_fmt ? "no data chunk" : "no fmt chunk");
}

const char* CodeName(grpc::StatusCode code) {
  static const char* const kNames[] = {
      "OK",        "CANCELLED",      "UNKNOWN",           "INVALID_ARGUMENT",   "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
      "ABORTED",   "OUT_OF_RANGE",   "UNIMPLEMENTED",     "INTERNAL",           "UNAVAILABLE",
      "DATA_LOSS", "UNAUTHENTICATED"};
  const int index = static_cast<int>(code);
  return index >= 0 && index < static_cast<int>(std::size(kNames)) ? kNames[index] : "UNKNOWN_CODE";
}

// "CALL failed: CODE: server's message" when the call failed.
void Check(const grpc::Status& status, const char* call) {
  if (!status.ok()) {
    throw RpcError(std::string(call) + " failed: " + CodeName(status.error_code()) + ": " + status.error_message());
  }
}

// gRPC's own retry policy (gRFC A6), the same in every client of this repository: a call that fails UNAVAILABLE
// (a server restarting, a connection refused) or RESOURCE_EXHAUSTED (a full queue) is sent again, at most 4
// attempts in all, after jittered exponential backoff from 0.2 s (at most 2 s). The server's
// "grpc-retry-pushback-ms" trailer overrides the backoff (its RetryInfo delay) or stops the retries (-1: audio over
// a limit, which no retry cures). A call is retried only until its first response header arrives, and a client
// stream only while gRPC still holds what was sent (its retry buffer). StreamingRecognize is left out: live audio
// is not replayed.
// gRPC C++ retries by default (since 1.29) once a policy is configured.
constexpr char kRetryServiceConfig[] = R"json({"methodConfig": [{"name": [{"service": "qwenasr.v1.AsrService", "method": "Transcribe"}, {"service": "qwenasr.v1.AsrService", "method": "TranscribeStream"}, {"service": "qwenasr.v1.AsrService", "method": "Align"}, {"service": "qwenasr.v1.AsrService", "method": "GetServerInfo"}, {"service": "grpc.health.v1.Health", "method": "Check"}], "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]}}]})json";

std::shared_ptr<grpc::Channel> RetryingChannel(const std::string& target) {
  grpc::ChannelArguments arguments;
  arguments.SetServiceConfigJSON(kRetryServiceConfig);
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), arguments);
}

class Client {
 public:
  Client(const std::string& target, std::string token) : channel_(RetryingChannel(target)), token_(std::move(token)) {}

  // A context with a 60 s deadline and, with a token, "authorization: Bearer TOKEN".
  std::unique_ptr<grpc::ClientContext> Context() const {
    auto context = std::make_unique<grpc::ClientContext>();
    context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    if (!token_.empty()) context->AddMetadata("authorization", "Bearer " + token_);
    return context;
  }

  std::shared_ptr<grpc::Channel> channel() const { return channel_; }

 private:
  std::shared_ptr<grpc::Channel> channel_;
  std::string token_;
};

std::string ToJson(const TranscribeResponse& response) {
  std::string json;
  google::protobuf::util::MessageToJsonString(response, &json);
  return json;
}

int Run(int argc, char** argv) {
  std::string target = "localhost:50051", language, file;
  const char* env_token = std::getenv("ASR_TOKEN");
  std::string token = env_token ? env_token : "";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--target" || arg == "--language" || arg == "--token") {
      if (i + 1 == argc) throw UsageError(arg + " needs a value; " + kUsage);
      (arg == "--target" ? target : arg == "--language" ? language : token) = argv[++i];
    } else if (arg == "-h" || arg == "--help") {
      std::cout << kUsage << "\n";
      return 0;
    } else if (arg.rfind("-", 0) == 0 || !file.empty()) {
      throw UsageError("unexpected argument " + arg + "; " + kUsage);
    } else {
      file = arg;
    }
  }
  if (file.empty()) throw UsageError(kUsage);

  std::ifstream in(file, std::ios::binary);
  if (!in) throw UsageError("cannot read " + file + ": " + std::strerror(errno));
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Wav wav;
  try {
    wav = ParseWav(bytes);
  } catch (const std::exception& error) {
    throw UsageError(file + ": not a usable WAV file: " + error.what());
  }

  Client client(target, token);
  auto health_stub = grpc::health::v1::Health::NewStub(client.channel());
  auto stub = AsrService::NewStub(client.channel());

  grpc::health::v1::HealthCheckResponse health;
  Check(health_stub->Check(client.Context().get(), {}, &health), "health check");

  // Unary: the whole file in one message; the server reads the format from the WAV header.
  qwenasr::v1::TranscribeRequest request;
  request.mutable_config()->set_language(language);
  request.set_audio(bytes);
  TranscribeResponse unary;
  Check(stub->Transcribe(client.Context().get(), request, &unary), "Transcribe");

  // Client streaming: a config message, then raw LINEAR16 PCM in 20 ms frames. Write() returns false once the
  // call has ended (the server refused it, usually); Finish() then returns the server's status.
  TranscribeResponse streamed;
  auto context = client.Context();
  auto upload = stub->TranscribeStream(context.get(), &streamed);
  qwenasr::v1::TranscribeStreamRequest message;
  auto* config = message.mutable_config();
  config->set_language(language);
  config->mutable_audio_format()->set_encoding(qwenasr::v1::AUDIO_ENCODING_LINEAR16);
  config->mutable_audio_format()->set_sample_rate_hz(wav.sample_rate);
  config->mutable_audio_format()->set_channel_count(wav.channels);
  if (upload->Write(message)) {
    const size_t frame_bytes = std::max<size_t>(wav.sample_rate / 50, 1) * wav.channels * 2;
    for (size_t pos = 0; pos < wav.pcm.size(); pos += frame_bytes) {
      message.set_audio(wav.pcm.substr(pos, frame_bytes));
      if (!upload->Write(message)) break;
    }
    upload->WritesDone();
  }
  Check(upload->Finish(), "TranscribeStream");

  std::cout << "{\"health\":\"" << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(health.status())
            << "\",\"unary\":" << ToJson(unary) << ",\"stream\":" << ToJson(streamed) << "}" << std::endl;
  return 0;
}

// One line on stderr.
int Fail(int code, std::string message) {
  std::replace(message.begin(), message.end(), '\n', ' ');
  std::cerr << "asr-client-cpp: " << message << std::endl;
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const UsageError& error) {
    return Fail(1, error.what());
  } catch (const RpcError& error) {
    return Fail(2, error.what());
  } catch (const std::exception& error) {
    return Fail(1, std::string("unexpected error: ") + error.what());
  }
}
