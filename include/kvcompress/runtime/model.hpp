#pragma once
// A TorchScript model that follows docs/MODEL_CONTRACT.md (versions 1 and 2). Part of
// kvcompress::runtime: needs <torch/script.h>.
#include <kvcompress/types.hpp>

#include <torch/script.h>

#include <fstream>
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
};

/// Contract versions this runtime reads.
constexpr int64_t kMinContractVersion = 1, kMaxContractVersion = 2;

/// The first line of an exception's message, without LibTorch's backtrace.
inline std::string first_line(const std::exception& e) {
  std::string msg = e.what();
  if (auto* c10e = dynamic_cast<const c10::Error*>(&e)) msg = c10e->what_without_backtrace();
  const auto nl = msg.find('\n');
  return nl == std::string::npos ? msg : msg.substr(0, nl);
}

class ContractModel {
 public:
  struct Step {
    at::Tensor logits;  ///< float32 [B, T, vocab]
    KVCache cache;      ///< per layer, past + new tokens
  };

  /// Loads `path` onto `device` in `dtype`; every failure is a kvcompress::Error naming the file.
  static ContractModel load(const std::string& path, at::Device device, at::ScalarType dtype) {
    if (!std::ifstream(path).good()) throw Error("model file not found or unreadable: " + path);
    ContractModel m;
    torch::jit::ExtraFilesMap extra{{"kvc/config.json", ""}, {"kvc/tokenizer.model", ""}};
    try {
      m.module_ = torch::jit::load(path, at::Device(at::kCPU), extra);
    } catch (const std::exception& e) {
      throw Error("cannot load model " + path + " (not a TorchScript file, corrupt, or saved by a newer "
                  "PyTorch): " + first_line(e));
    }
    m.config_json_ = extra["kvc/config.json"];
    m.tokenizer_model_ = extra["kvc/tokenizer.model"];
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
  const std::string& tokenizer_model() const { return tokenizer_model_; }
  const std::string& config_json() const { return config_json_; }
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

  /// Whether the model offers the fixed-capacity `step` method.
  bool has_step() const { return module_.find_method("step").has_value(); }

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
    c10::List<at::Tensor> keys, values;
    keys.reserve(past.size());
    values.reserve(past.size());
    for (const auto& [k, v] : past) {
      keys.push_back(k);
      values.push_back(v);
    }
    at::IValue out;
    try {
      out = module_.forward({input_ids, position_ids, keys, values});
    } catch (const std::exception& e) {
      throw Error("model forward failed: " + first_line(e));
    }
    const char* contract = "model forward must return (logits, keys, values): a Tensor and two lists of "
                           "num_layers Tensors (docs/MODEL_CONTRACT.md)";
    if (!out.isTuple()) throw Error(std::string(contract) + ", got " + out.tagKind());
    const auto& elems = out.toTupleRef().elements();
    if (elems.size() != 3 || !elems[0].isTensor() || !elems[1].isTensorList() || !elems[2].isTensorList())
      throw Error(contract);
    Step step;
    step.logits = elems[0].toTensor();
    auto new_keys = elems[1].toTensorList(), new_values = elems[2].toTensorList();
    if (static_cast<int64_t>(new_keys.size()) != info_.num_layers || new_values.size() != new_keys.size())
      throw Error(std::string(contract) + "; got " + std::to_string(new_keys.size()) + " keys and " +
                  std::to_string(new_values.size()) + " values for " + std::to_string(info_.num_layers) + " layers");
    step.cache.reserve(new_keys.size());
    for (size_t i = 0; i < new_keys.size(); ++i) step.cache.emplace_back(new_keys[i], new_values[i]);
    return step;
  }

 private:
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

  torch::jit::Module module_;
  ModelInfo info_;
  std::string config_json_, tokenizer_model_;
  at::Device device_ = at::kCPU;
  at::ScalarType dtype_ = at::kFloat;
};

}  // namespace runtime
}  // namespace kvcompress
