#pragma once
// A TorchScript model that follows docs/MODEL_CONTRACT.md (versions 1 to 5). Part of
// kvcompress::runtime: needs <torch/script.h>.
#include <kvcompress/params.hpp>
#include <kvcompress/runtime/native_step.hpp>
#include <kvcompress/runtime/tokenizer.hpp>
#include <kvcompress/types.hpp>
#include <kvcompress/validate.hpp>

#include <torch/script.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace kvcompress {
namespace runtime {

/// What the driver reads of a contract model (its TorchScript attributes).
struct ModelInfo {
  std::string name;
  int64_t num_layers = 0, num_heads = 0, head_dim = 0, vocab_size = 0;
  int64_t rotary_ndims = 0, max_positions = 0;
  double rotary_base = 10000.0;
  int64_t eos_token_id = -1;
  int64_t contract_version = 1;
  /// Version 2: position_ids may be [num_layers, B, T], one position per layer.
  bool per_layer_positions() const { return contract_version >= 2; }
  /// Version 5: `step`'s lengths may be [num_layers, B], one valid length per row (rows that
  /// hold different caches, as one-pass evaluation runs them).
  bool per_row_lengths() const { return contract_version >= 5; }
};

/// Contract versions this runtime reads.
constexpr int64_t kMinContractVersion = 1, kMaxContractVersion = 5;

/// The line of an exception's message that says what went wrong, without LibTorch's backtrace:
/// its first line; for an error inside a TorchScript method, whose first line is only "The
/// following operation failed in the TorchScript interpreter.", the cause after the script's
/// traceback ("RuntimeError: CUDA out of memory. ..."), so that it is neither lost nor hidden.
inline std::string first_line(const std::exception& e) {
  std::string msg = e.what();
  if (auto* c10e = dynamic_cast<const c10::Error*>(&e)) msg = c10e->what_without_backtrace();
  const auto nl = msg.find('\n');
  if (nl == std::string::npos) return msg;
  if (msg.rfind("The following operation failed in the TorchScript interpreter", 0) == 0) {
    // The cause: the last line that starts with an error class ("RuntimeError: ...").
    std::string cause;
    for (size_t at = nl + 1; at < msg.size();) {
      const size_t end = std::min(msg.find('\n', at), msg.size());
      const std::string line = msg.substr(at, end - at);
      const size_t colon = line.find(": ");
      const std::string head = colon == std::string::npos ? "" : line.substr(0, colon);
      auto ends_with = [&head](const std::string& tail) {
        return head.size() > tail.size() && head.compare(head.size() - tail.size(), tail.size(), tail) == 0;
      };
      if (head.find(' ') == std::string::npos && (ends_with("Error") || ends_with("Exception"))) cause = line;
      at = end + 1;
    }
    if (!cause.empty()) return cause;
  }
  return msg.substr(0, nl);
}

class ContractModel {
 public:
  struct Step {
    at::Tensor logits;  ///< float32 [B, T, vocab]
    KVCache cache;      ///< per layer, past + new tokens
    /// forward_scored only: per layer, the attention each slot of `cache` received from the new
    /// tokens (float32 [B, H, past + T]) and the last queries ([B, H, n, D]); empty if not asked.
    std::vector<at::Tensor> attention, queries;
  };

  /// Loads `file` onto `device` in `dtype`; every failure is a kvcompress::Error naming the file.
  static ContractModel load(const std::string& file, at::Device device, at::ScalarType dtype) {
    const std::string path = params::printable(file);  // as messages quote it
    if (!std::ifstream(file).good()) throw Error("model file not found or unreadable: " + path);
    ContractModel m;
    torch::jit::ExtraFilesMap extra{{"kvc/config.json", ""}, {"kvc/tokenizer.json", ""}, {"kvc/tokenizer.model", ""}};
    try {
      m.module_ = torch::jit::load(file, at::Device(at::kCPU), extra);
    } catch (const std::exception& e) {
      throw Error("cannot load model " + path + " (not a TorchScript file, corrupt, or saved by a newer "
                  "PyTorch): " + first_line(e));
    }
    m.config_json_ = extra["kvc/config.json"];
    m.tokenizer_model_ = extra["kvc/tokenizer.model"];
    m.tokenizer_json_ = extra["kvc/tokenizer.json"];
    m.path_ = path;
    m.info_ = read_info(m.module_, path);
    if (!m.module_.find_method("forward"))
      throw Error("model " + path + " has no forward method (see docs/MODEL_CONTRACT.md)");
    try {
      m.module_.eval();
      m.module_.to(device, dtype);
    } catch (const std::exception& e) {
      throw Error("cannot move model " + path + " to " + device.str() + "/" +
                  c10::toString(dtype) + ": " + first_line(e));
    }
    m.device_ = device;
    m.dtype_ = dtype;
    return m;
  }

  const ModelInfo& info() const { return info_; }
  /// The embedded tokenizer's bytes, if any: a SentencePiece model (kvc/tokenizer.model) or a
  /// Hugging Face tokenizer.json (kvc/tokenizer.json).
  const std::string& tokenizer_model() const { return tokenizer_model_; }
  const std::string& tokenizer_json() const { return tokenizer_json_; }
  bool has_tokenizer() const { return !tokenizer_json_.empty() || !tokenizer_model_.empty(); }
  /// The embedded tokenizer (the tokenizer.json when a file has both); an Error naming the
  /// remedies when the file embeds none.
  std::unique_ptr<Tokenizer> tokenizer() const {
    if (!tokenizer_json_.empty()) return tokenizer_from_bytes(tokenizer_json_, path_ + ":kvc/tokenizer.json");
    if (!tokenizer_model_.empty()) return tokenizer_from_bytes(tokenizer_model_, path_ + ":kvc/tokenizer.model");
    throw Error("model " + path_ + " embeds no tokenizer (neither kvc/tokenizer.json nor kvc/tokenizer.model): "
                "give token ids (kvbench --tokens; make them with kvtok), or re-export the model with "
                "examples/python/export_pythia.py, which embeds the checkpoint's tokenizer.json");
  }
  const std::string& config_json() const { return config_json_; }
  /// Bytes of the model's parameters (what one call streams from memory at least once).
  int64_t parameter_bytes() const {
    int64_t bytes = 0;
    for (const auto& p : module_.parameters()) bytes += static_cast<int64_t>(p.numel() * p.element_size());
    return bytes;
  }
  at::Device device() const { return device_; }
  at::ScalarType dtype() const { return dtype_; }

  /// An empty cache ([batch, heads, 0, head_dim] per layer) in the model's dtype and device.
  KVCache empty_cache(int64_t batch = 1) const {
    auto opts = at::TensorOptions().dtype(dtype_).device(device_);
    KVCache kv;
    for (int64_t i = 0; i < info_.num_layers; ++i)
      kv.emplace_back(at::empty({batch, info_.num_heads, 0, info_.head_dim}, opts),
                      at::empty({batch, info_.num_heads, 0, info_.head_dim}, opts));
    return kv;
  }

  /// The one-token `step` in kvcompress's own CUDA kernels (native_step.hpp; on the CPU its
  /// algorithm in ATen operators), built on first use from this model's weights and shared by
  /// every decoder of it. Throws kvcompress::Error naming why when it cannot run here (a CUDA
  /// model in a build without the kernels, an unsupported model).
  NativeStep& native_step() {
    if (!native_step_) {
      NativeStepModel m;
      m.name = info_.name;
      m.num_layers = info_.num_layers;
      m.num_heads = info_.num_heads;
      m.head_dim = info_.head_dim;
      m.rotary_ndims = info_.rotary_ndims;
      m.rotary_base = info_.rotary_base;
      m.layer_norm_eps = config_number("layer_norm_eps", 1e-5);
      m.parallel_residual = config_flag("use_parallel_residual", true);
      for (const auto& p : module_.named_parameters()) m.parameters.emplace_back(p.name, p.value);
      native_step_ = std::make_shared<NativeStep>(m);
    }
    return *native_step_;
  }

  /// Whether the model offers the fixed-capacity `step` method.
  bool has_step() const { return module_.find_method("step").has_value(); }
  /// Whether the model offers contract version 3's forward_scored and step_scored (attention
  /// per cached slot and recent queries, for attention-aware policies).
  bool has_scored() const {
    return info_.contract_version >= 3 && module_.find_method("forward_scored").has_value() &&
           module_.find_method("step_scored").has_value();
  }

  /// Whether the scored methods take version 4's slot_bias (slots hidden per head, for
  /// per-head budgets).
  bool has_slot_bias() const { return info_.contract_version >= 4 && has_scored(); }

  /// The contract's `step_scored`: `step`, plus decay * attention + the new attention into
  /// `attention_buffers` and the last query_slots.size(0) queries into `query_buffers` at those
  /// slots (empty lists skip either); `slot_bias` (version 4; empty = none) per layer
  /// [B, H, C_i] added to the attention scores over the slots.
  at::Tensor step_scored(const at::Tensor& input_ids, const at::Tensor& position_ids,
                         const c10::List<at::Tensor>& key_buffers, const c10::List<at::Tensor>& value_buffers,
                         const at::Tensor& lengths, const c10::List<at::Tensor>& attention_buffers, double decay,
                         const c10::List<at::Tensor>& query_buffers, const at::Tensor& query_slots,
                         const c10::List<at::Tensor>& slot_bias = c10::List<at::Tensor>()) {
    check_slot_bias(key_buffers, slot_bias);
    std::vector<at::IValue> args{input_ids, position_ids, key_buffers, value_buffers, lengths,
                                 attention_buffers, decay, query_buffers, query_slots};
    add_slot_bias(args, slot_bias, "step_scored");
    at::IValue out;
    try {
      out = module_.get_method("step_scored")(std::move(args));
    } catch (const std::exception& e) {
      throw Error("model step_scored failed: " + first_line(e));
    }
    if (!out.isTensor())
      throw Error("model step_scored must return the logits Tensor (docs/MODEL_CONTRACT.md), got " + out.tagKind());
    return out.toTensor();
  }

  /// The contract's `forward_scored`: forward plus, per layer, the attention each slot received
  /// (when `attention`) and the last min(T, query_window) queries; `slot_bias` (version 4;
  /// empty = none) per layer [B, H, past] added to the attention scores over the past slots.
  Step forward_scored(const at::Tensor& input_ids, const at::Tensor& position_ids, const KVCache& past,
                      bool attention, int64_t query_window,
                      const c10::List<at::Tensor>& slot_bias = c10::List<at::Tensor>()) {
    std::vector<at::IValue> args{input_ids, position_ids, tensor_list(past, true), tensor_list(past, false),
                                 attention, query_window};
    add_slot_bias(args, slot_bias, "forward_scored");
    at::IValue out;
    try {
      out = module_.get_method("forward_scored")(std::move(args));
    } catch (const std::exception& e) {
      throw Error("model forward_scored failed: " + first_line(e));
    }
    const char* contract = "model forward_scored must return (logits, keys, values, attention, queries): a Tensor "
                           "and four lists of Tensors (docs/MODEL_CONTRACT.md)";
    if (!out.isTuple() || out.toTupleRef().elements().size() != 5) throw Error(contract);
    const auto& e = out.toTupleRef().elements();
    if (!e[3].isTensorList() || !e[4].isTensorList()) throw Error(contract);
    Step step = unpack(e[0], e[1], e[2], contract);
    for (const auto& t : e[3].toTensorList()) step.attention.push_back(t);
    for (const auto& t : e[4].toTensorList()) step.queries.push_back(t);
    const size_t layers = static_cast<size_t>(info_.num_layers);
    if ((attention && step.attention.size() != layers) || (query_window > 0 && step.queries.size() != layers))
      throw Error(std::string(contract) + "; got " + std::to_string(step.attention.size()) + " attention and " +
                  std::to_string(step.queries.size()) + " query tensors for " + std::to_string(layers) + " layers");
    return step;
  }

  /// The contract's `step`: writes the new tokens into caller-owned buffers; returns logits.
  at::Tensor step(const at::Tensor& input_ids, const at::Tensor& position_ids, const c10::List<at::Tensor>& key_buffers,
                  const c10::List<at::Tensor>& value_buffers, const at::Tensor& lengths) {
    at::IValue out;
    try {
      out = module_.get_method("step")({input_ids, position_ids, key_buffers, value_buffers, lengths});
    } catch (const std::exception& e) {
      throw Error("model step failed: " + first_line(e));
    }
    if (!out.isTensor())
      throw Error("model step must return the logits Tensor (docs/MODEL_CONTRACT.md), got " + out.tagKind());
    return out.toTensor();
  }

  /// One call of the contract's forward: ids and positions [B, T] int64 on the model's device.
  Step forward(const at::Tensor& input_ids, const at::Tensor& position_ids, const KVCache& past) {
    at::IValue out;
    try {
      out = module_.forward({input_ids, position_ids, tensor_list(past, true), tensor_list(past, false)});
    } catch (const std::exception& e) {
      throw Error("model forward failed: " + first_line(e));
    }
    const char* contract = "model forward must return (logits, keys, values): a Tensor and two lists of "
                           "num_layers Tensors (docs/MODEL_CONTRACT.md)";
    if (!out.isTuple()) throw Error(std::string(contract) + ", got " + out.tagKind());
    const auto& elems = out.toTupleRef().elements();
    if (elems.size() != 3) throw Error(std::string(contract) + ", got a tuple of " + std::to_string(elems.size()));
    return unpack(elems[0], elems[1], elems[2], contract);
  }

 private:
  // A step's masks must match its buffers slot for slot: one that is shorter would broadcast
  // inside the step (a mask of one slot over them all) instead of failing.
  static void check_slot_bias(const c10::List<at::Tensor>& key_buffers, const c10::List<at::Tensor>& slot_bias) {
    if (slot_bias.empty()) return;
    if (slot_bias.size() != key_buffers.size())
      throw Error("model step_scored: " + std::to_string(slot_bias.size()) + " slot_bias masks for " +
                  std::to_string(key_buffers.size()) + " layers of key buffers");
    for (size_t l = 0; l < slot_bias.size(); ++l) {
      const at::Tensor bias = slot_bias.get(l), keys = key_buffers.get(l);
      if (bias.dim() != 3 || keys.dim() != 4 || bias.sizes() != keys.sizes().slice(0, 3))
        throw Error("model step_scored: layer " + std::to_string(l) + "'s slot_bias is " + kvcompress::detail::shape_text(bias) +
                    "; it must be [B, H, C] like its key buffer " + kvcompress::detail::shape_text(keys));
    }
  }

  // Version 4's last argument; older files have none, and cannot hide slots.
  void add_slot_bias(std::vector<at::IValue>& args, const c10::List<at::Tensor>& slot_bias, const char* method) const {
    if (info_.contract_version >= 4) {
      args.emplace_back(slot_bias);
      return;
    }
    if (!slot_bias.empty())
      throw Error(std::string("model ") + method + ": slots hidden per head (slot_bias) need contract version 4; '" +
                  info_.name + "' is version " + std::to_string(info_.contract_version) +
                  " -- upgrade it with examples/python/upgrade_contract.py");
  }

  static c10::List<at::Tensor> tensor_list(const KVCache& kv, bool keys) {
    c10::List<at::Tensor> out;
    out.reserve(kv.size());
    for (const auto& layer : kv) out.push_back(keys ? layer.first : layer.second);
    return out;
  }

  // (logits, keys, values) of forward / forward_scored, checked against the contract.
  Step unpack(const at::IValue& logits, const at::IValue& keys, const at::IValue& values, const char* contract) const {
    if (!logits.isTensor() || !keys.isTensorList() || !values.isTensorList()) throw Error(contract);
    Step step;
    step.logits = logits.toTensor();
    auto new_keys = keys.toTensorList(), new_values = values.toTensorList();
    if (static_cast<int64_t>(new_keys.size()) != info_.num_layers || new_values.size() != new_keys.size())
      throw Error(std::string(contract) + "; got " + std::to_string(new_keys.size()) + " keys and " +
                  std::to_string(new_values.size()) + " values for " + std::to_string(info_.num_layers) + " layers");
    step.cache.reserve(new_keys.size());
    for (size_t i = 0; i < new_keys.size(); ++i) step.cache.emplace_back(new_keys[i], new_values[i]);
    return step;
  }

  static ModelInfo read_info(const torch::jit::Module& m, const std::string& path) {
    auto get = [&](const char* name) -> at::IValue {
      if (!m.hasattr(name))
        throw Error("model " + path + " does not follow the kvcompress model contract: missing attribute '" +
                    name + "' (see docs/MODEL_CONTRACT.md)");
      return m.attr(name);
    };
    auto get_int = [&](const char* name, int64_t min) {
      at::IValue v = get(name);
      if (!v.isInt() || v.toInt() < min)
        throw Error("model " + path + ": attribute '" + name + "' must be an integer >= " + std::to_string(min));
      return v.toInt();
    };
    const int64_t version = get_int("kvc_contract_version", 1);
    if (version < kMinContractVersion || version > kMaxContractVersion)
      throw Error("model " + path + " uses contract version " + std::to_string(version) +
                  "; this kvcompress runtime reads versions " + std::to_string(kMinContractVersion) + " to " +
                  std::to_string(kMaxContractVersion));
    ModelInfo info;
    info.contract_version = version;
    at::IValue name = get("model_name");
    info.name = name.isString() ? name.toStringRef() : "unnamed";
    info.num_layers = get_int("num_layers", 1);
    info.num_heads = get_int("num_heads", 1);
    info.head_dim = get_int("head_dim", 1);
    info.vocab_size = get_int("vocab_size", 1);
    info.rotary_ndims = get_int("rotary_ndims", 0);
    info.max_positions = get_int("max_positions", 1);
    at::IValue base = get("rotary_base");
    if (!base.isDouble()) throw Error("model " + path + ": attribute 'rotary_base' must be a float");
    info.rotary_base = base.toDouble();
    if (m.hasattr("eos_token_id") && m.attr("eos_token_id").isInt())
      info.eos_token_id = m.attr("eos_token_id").toInt();
    return info;
  }

  // A number or flag of the embedded config (kvc/config.json); `fallback` when the key is absent.
  double config_number(const std::string& key, double fallback) const {
    const auto at = config_value(key);
    if (at == std::string::npos) return fallback;
    char* end = nullptr;
    const double v = std::strtod(config_json_.c_str() + at, &end);
    if (end == config_json_.c_str() + at)
      throw Error("model " + path_ + ": kvc/config.json's \"" + key + "\" is not a number");
    return v;
  }
  bool config_flag(const std::string& key, bool fallback) const {
    const auto at = config_value(key);
    if (at == std::string::npos) return fallback;
    if (config_json_.compare(at, 4, "true") == 0) return true;
    if (config_json_.compare(at, 5, "false") == 0) return false;
    throw Error("model " + path_ + ": kvc/config.json's \"" + key + "\" is not true or false");
  }
  // Offset of the value of top-level-or-nested `key` in the config text (npos when absent).
  size_t config_value(const std::string& key) const {
    size_t at = config_json_.find("\"" + key + "\"");
    if (at == std::string::npos) return at;
    at = config_json_.find(':', at + key.size() + 2);
    if (at == std::string::npos) return at;
    return config_json_.find_first_not_of(" \t\r\n", at + 1);
  }

  torch::jit::Module module_;
  ModelInfo info_;
  std::string config_json_, tokenizer_model_, tokenizer_json_, path_;
  at::Device device_ = at::kCPU;
  at::ScalarType dtype_ = at::kFloat;
  std::shared_ptr<NativeStep> native_step_;  // built by native_step()
};

}  // namespace runtime
}  // namespace kvcompress
