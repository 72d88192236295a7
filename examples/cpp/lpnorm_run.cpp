// lpnorm_run MODEL IN.pt OUT.pt: runs a model that uses lpnorm's modules, without Python.
//
// MODEL is a TorchScript file (torch.jit.save) or an AOTInductor package (*.pt2, from
// torch._inductor.aoti_compile_and_package). IN.pt is one tensor saved by Python's torch.save;
// OUT.pt holds (name, tensor) pairs, dict(torch.load("OUT.pt")) in Python (a tuple: a C++ dict
// would carry a type tag that torch.load's weights_only mode refuses):
//   both routes   "eval"       the model's output
//   TorchScript   "train"      the output in training mode (batch statistics)
//                 "input_grad", "grad.<param>"   from loss = sum(train * ramp), ramp =
//                              linspace(-1, 1, numel) in train's shape
//                 "param.<name>", "buffer.<name>" after one SGD step (lr 0.1) and the
//                              running-statistics update
//                 "direct"     lpnorm::batch_norm(IN, training, norm "l1") through the C++ API
// The operators come from liblpnorm_ops, which lpnorm::lpnorm links; the models find them by
// name (lpnorm::batch_norm) in the dispatcher.
#include <lpnorm/lpnorm.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr double kLearningRate = 0.1;

// (name, tensor) in the order written.
class Outputs {
 public:
  void insert(const std::string& name, const at::Tensor& tensor) {
    pairs_.emplace_back(c10::ivalue::Tuple::create({c10::IValue(name), c10::IValue(tensor)}));
  }
  c10::IValue to_ivalue() const { return c10::ivalue::Tuple::create(pairs_); }

 private:
  std::vector<c10::IValue> pairs_;
};

at::Tensor read_tensor(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  c10::IValue value = torch::jit::pickle_load(bytes);
  if (!value.isTensor()) throw std::runtime_error(path + " does not hold one tensor (torch.save(tensor, path))");
  return value.toTensor();
}

void write_outputs(const std::string& path, const Outputs& outputs) {
  std::vector<char> bytes = torch::jit::pickle_save(outputs.to_ivalue());
  std::ofstream file(path, std::ios::binary);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!file) throw std::runtime_error("cannot write " + path);
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void run_aoti(const std::string& model_path, const at::Tensor& input, Outputs& out) {
  torch::inductor::AOTIModelPackageLoader loader(model_path);
  std::vector<at::Tensor> outputs = loader.run({input});
  out.insert("eval", outputs.at(0));
}

void run_torchscript(const std::string& model_path, const at::Tensor& input,
                     Outputs& out) {
  torch::jit::Module module = torch::jit::load(model_path);

  module.eval();
  {
    torch::NoGradGuard no_grad;
    out.insert("eval", module.forward({input}).toTensor());
  }

  module.train();
  at::Tensor x = input.detach().clone().requires_grad_(true);
  at::Tensor y = module.forward({x}).toTensor();
  at::Tensor ramp = torch::linspace(-1.0, 1.0, y.numel(), y.options()).view(y.sizes());
  (y * ramp).sum().backward();
  out.insert("train", y.detach());
  out.insert("input_grad", x.grad());

  torch::NoGradGuard no_grad;
  for (const auto& param : module.named_parameters()) {
    if (!param.value.grad().defined()) throw std::runtime_error("no gradient for parameter " + param.name);
    out.insert("grad." + param.name, param.value.grad().clone());
    param.value.sub_(param.value.grad() * kLearningRate);
    out.insert("param." + param.name, param.value.clone());
  }
  for (const auto& buffer : module.named_buffers()) out.insert("buffer." + buffer.name, buffer.value.clone());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " MODEL(.pt|.pt2) IN.pt OUT.pt\n"
              << "  lpnorm " << lpnorm::version() << ", built for torch " << lpnorm::torch_version() << "\n";
    return 2;
  }
  const std::string model_path = argv[1];
  try {
    const at::Tensor input = read_tensor(argv[2]);
    Outputs out;
    if (ends_with(model_path, ".pt2")) {
      run_aoti(model_path, input, out);
    } else {
      run_torchscript(model_path, input, out);
    }
    {
      torch::NoGradGuard no_grad;
      out.insert("direct", lpnorm::batch_norm(input, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                                              /*training=*/true, 0.1, 1e-5, "l1"));
    }
    write_outputs(argv[3], out);
  } catch (const std::exception& error) {
    std::cerr << "lpnorm_run: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
