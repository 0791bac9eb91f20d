// Example C++ client for the Qwen3-ASR server: checks health, transcribes a WAV file with the unary
// Transcribe call, uploads the same audio as 20 ms PCM frames over TranscribeStream, prints JSON.
//
//   asr-client-cpp [--target localhost:50051] [--language English] speech.wav
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
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

struct Wav {
  std::string pcm;  // 16-bit little-endian samples, channels interleaved
  uint32_t sample_rate = 0;
  uint32_t channels = 0;
};

uint32_t le(const std::string& data, size_t pos, int bytes) {
  uint32_t value = 0;
  for (int i = bytes - 1; i >= 0; --i) value = (value << 8) | static_cast<uint8_t>(data[pos + i]);
  return value;
}

// The 16-bit PCM samples of a WAV file with its sample rate and channel count.
Wav ParseWav(const std::string& data) {
  if (data.size() < 12 || data.compare(0, 4, "RIFF") != 0 || data.compare(8, 4, "WAVE") != 0) {
    throw std::runtime_error("not a RIFF/WAVE file");
  }
  Wav wav;
  for (size_t pos = 12; pos + 8 <= data.size();) {
    std::string id = data.substr(pos, 4);
    uint32_t size = le(data, pos + 4, 4);
    if (id == "fmt ") {
      if (le(data, pos + 8, 2) != 1 || le(data, pos + 22, 2) != 16) throw std::runtime_error("only 16-bit PCM WAV");
      wav.channels = le(data, pos + 10, 2);
      wav.sample_rate = le(data, pos + 12, 4);
    } else if (id == "data") {
      wav.pcm = data.substr(pos + 8, size);
      return wav;
    }
    pos += 8 + size + size % 2;
  }
  throw std::runtime_error("no data chunk");
}

std::unique_ptr<grpc::ClientContext> ContextWithDeadline() {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  return context;
}

void Check(const grpc::Status& status, const char* what) {
  if (!status.ok()) throw std::runtime_error(std::string(what) + ": " + status.error_message());
}

std::string ToJson(const TranscribeResponse& response) {
  std::string json;
  google::protobuf::util::MessageToJsonString(response, &json);
  return json;
}

}  // namespace

int main(int argc, char** argv) {
  std::string target = "localhost:50051", language, file;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--target" && i + 1 < argc) target = argv[++i];
    else if (arg == "--language" && i + 1 < argc) language = argv[++i];
    else file = arg;
  }
  if (file.empty()) {
    std::cerr << "usage: asr-client-cpp [--target host:port] [--language L] FILE.wav\n";
    return 2;
  }
  try {
    std::ifstream in(file, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read " + file);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    Wav wav = ParseWav(bytes);

    auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
    auto health_stub = grpc::health::v1::Health::NewStub(channel);
    auto stub = AsrService::NewStub(channel);

    grpc::health::v1::HealthCheckResponse health;
    Check(health_stub->Check(ContextWithDeadline().get(), {}, &health), "health");

    // Unary: the whole file in one message; the server reads the format from the WAV header.
    qwenasr::v1::TranscribeRequest request;
    request.mutable_config()->set_language(language);
    request.set_audio(bytes);
    TranscribeResponse unary;
    Check(stub->Transcribe(ContextWithDeadline().get(), request, &unary), "Transcribe");

    // Client streaming: a config message, then raw LINEAR16 PCM in 20 ms frames.
    TranscribeResponse streamed;
    auto context = ContextWithDeadline();
    auto upload = stub->TranscribeStream(context.get(), &streamed);
    qwenasr::v1::TranscribeStreamRequest message;
    auto* config = message.mutable_config();
    config->set_language(language);
    config->mutable_audio_format()->set_encoding(qwenasr::v1::AUDIO_ENCODING_LINEAR16);
    config->mutable_audio_format()->set_sample_rate_hz(wav.sample_rate);
    config->mutable_audio_format()->set_channel_count(wav.channels);
    upload->Write(message);
    const size_t frame_bytes = wav.sample_rate / 50 * wav.channels * 2;
    for (size_t pos = 0; pos < wav.pcm.size(); pos += frame_bytes) {
      message.set_audio(wav.pcm.substr(pos, frame_bytes));
      if (!upload->Write(message)) break;  // the server ended the call early; Finish() says why
    }
    upload->WritesDone();
    Check(upload->Finish(), "TranscribeStream");

    std::cout << "{\"health\":\"" << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(health.status())
              << "\",\"unary\":" << ToJson(unary) << ",\"stream\":" << ToJson(streamed) << "}" << std::endl;
  } catch (const std::exception& error) {
    std::cerr << "asr-client-cpp: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
