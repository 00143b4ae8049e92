// Contiguous parameter storage: packing, views, hooks and staleness checks.
#include "ringflow/ad/parameter_store.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <unordered_set>

namespace ringflow::ad {

template <class S>
basic_tensor<S> make_parameter(std::string name, shape s) {
  auto t = basic_tensor<S>::zeros(s, /*requires_grad=*/true);
  t.node()->name = std::move(name);
  t.node()->is_parameter = true;
  t.grad();  // parameters always have a gradient buffer
  return t;
}

template <class S>
struct parameter_store<S>::state {
  std::shared_ptr<std::vector<S>> values = std::make_shared<std::vector<S>>();
  std::shared_ptr<std::vector<S>> grads = std::make_shared<std::vector<S>>();
  std::vector<parameter_info<S>> params;
  hook_type hook;
  std::size_t numel = 0;  // values->size() unless the values are released
  bool grads_released = false;
  bool values_released = false;
};

template <class S>
parameter_store<S>::parameter_store() : state_(std::make_shared<state>()) {}

template <class S>
basic_tensor<S> parameter_store<S>::add(std::string name, shape s) {
  auto p = make_parameter<S>(std::move(name), s);
  std::vector<std::pair<std::string, basic_tensor<S>>> all;
  for (const auto& info : state_->params) all.emplace_back(info.name, info.tensor);
  all.emplace_back(p.node()->name, p);
  pack(all);
  return p;
}

namespace {
template <class S>
void install_hook(detail::node<S>& n, std::size_t i,
                  const typename parameter_store<S>::hook_type& hook) {
  if (!hook) {
    n.grad_ready = nullptr;
    return;
  }
  n.grad_ready = [hook, i](detail::node<S>& self) {
    hook(i, basic_tensor<S>(self.shared_from_this()));
  };
}
}  // namespace

template <class S>
void parameter_store<S>::pack(const std::vector<std::pair<std::string, basic_tensor<S>>>& params) {
  std::unordered_set<const detail::node<S>*> seen;
  std::size_t total = 0;
  for (const auto& [name, t] : params) {
    if (!t.defined() || !t.is_leaf()) {
      throw usage_error(
          fmt::format("ad::parameter_store::pack: '{}' is {}; parameters must be leaf tensors (see "
                      "ad::make_parameter)",
                      name, t.defined() ? "the result of an op" : "empty"));
    }
    if (!seen.insert(t.node().get()).second) {
      throw usage_error(fmt::format(
          "ad::parameter_store::pack: '{}' is listed twice; a shared parameter must appear "
          "once",
          name));
    }
    total += static_cast<std::size_t>(t.numel());
  }
  auto values = std::make_shared<std::vector<S>>(total);
  auto grads = std::make_shared<std::vector<S>>(total);
  std::vector<parameter_info<S>> infos;
  std::size_t offset = 0;
  for (const auto& [name, t] : params) {
    auto& n = *t.node();
    const auto size = static_cast<std::size_t>(n.dims.numel());
    std::copy_n(n.value_ptr(), size, values->data() + offset);
    if (n.grad) std::copy_n(n.grad.get(), size, grads->data() + offset);
    n.value = std::shared_ptr<S>(values, values->data() + offset);
    n.grad = std::shared_ptr<S>(grads, grads->data() + offset);
    n.make_grad = nullptr;
    n.make_value = nullptr;
    n.name = name;
    n.is_parameter = true;  // requires_grad is left as is: a frozen parameter stays frozen
    infos.push_back({name, offset, size, t});
    offset += size;
  }
  state_->values = std::move(values);
  state_->grads = std::move(grads);
  state_->grads_released = false;
  state_->values_released = false;
  state_->numel = total;
  state_->params = std::move(infos);
  for (std::size_t i = 0; i < state_->params.size(); ++i) {
    install_hook<S>(*state_->params[i].tensor.node(), i, state_->hook);
  }
}

template <class S>
std::size_t parameter_store<S>::size() const {
  return state_->params.size();
}

template <class S>
std::size_t parameter_store<S>::numel() const {
  return state_->numel;
}

template <class S>
const parameter_info<S>& parameter_store<S>::operator[](std::size_t i) const {
  if (i >= state_->params.size()) {
    throw usage_error(fmt::format("ad::parameter_store: index {} out of range (size {})", i,
                                  state_->params.size()));
  }
  return state_->params[i];
}

template <class S>
const parameter_info<S>& parameter_store<S>::at(std::string_view name) const {
  for (const auto& p : state_->params) {
    if (p.name == name) return p;
  }
  std::string known;
  for (const auto& p : state_->params) known += (known.empty() ? "" : ", ") + p.name;
  throw usage_error(fmt::format("ad::parameter_store::at: no parameter '{}'; known: {}", name,
                                known.empty() ? "(none)" : known));
}

template <class S>
const parameter_info<S>* parameter_store<S>::begin() const {
  return state_->params.data();
}

template <class S>
const parameter_info<S>* parameter_store<S>::end() const {
  return state_->params.data() + state_->params.size();
}

template <class S>
std::span<S> parameter_store<S>::all_values() const {
  return {state_->values->data(), state_->values->size()};
}

template <class S>
std::span<S> parameter_store<S>::all_grads() const {
  return {state_->grads->data(), state_->grads->size()};
}

template <class S>
void parameter_store<S>::zero_grad() const {
  for (auto& p : state_->params) {
    if (p.tensor.node()->sparse) p.tensor.node()->sparse->clear();
  }
  if (state_->grads_released) {
    for (auto& p : state_->params) p.tensor.node()->grad.reset();
    return;
  }
  std::fill(state_->grads->begin(), state_->grads->end(), S(0));
}

template <class S>
void parameter_store<S>::release_grads(grad_allocator alloc) const {
  if (state_->grads_released) return;
  for (std::size_t i = 0; i < state_->params.size(); ++i) {
    auto& n = *state_->params[i].tensor.node();
    n.grad.reset();
    if (alloc) {
      n.make_grad = [alloc, i] { return alloc(i); };
    } else {
      n.make_grad = nullptr;
    }
  }
  state_->grads = std::make_shared<std::vector<S>>();
  state_->grads_released = true;
}

template <class S>
void parameter_store<S>::pack_grads() const {
  if (!state_->grads_released) return;
  auto grads = std::make_shared<std::vector<S>>(state_->numel, S(0));
  for (auto& p : state_->params) {
    auto& n = *p.tensor.node();
    if (n.grad) std::copy_n(n.grad.get(), p.size, grads->data() + p.offset);
    n.grad = std::shared_ptr<S>(grads, grads->data() + p.offset);
    n.make_grad = nullptr;
  }
  state_->grads = std::move(grads);
  state_->grads_released = false;
}

template <class S>
bool parameter_store<S>::grads_released() const {
  return state_->grads_released;
}

template <class S>
void parameter_store<S>::release_values(value_allocator alloc) const {
  if (!alloc) {
    throw usage_error(
        "ad::parameter_store::release_values: no allocator given; the released values must be "
        "made again somewhere when read");
  }
  for (std::size_t i = 0; i < state_->params.size(); ++i) {
    auto& n = *state_->params[i].tensor.node();
    n.value.reset();
    n.make_value = [alloc, i] { return alloc(i); };
  }
  state_->values = std::make_shared<std::vector<S>>();
  state_->values_released = true;
}

template <class S>
void parameter_store<S>::pack_values(std::vector<S> values) const {
  if (values.size() != state_->numel) {
    throw usage_error(
        fmt::format("ad::parameter_store::pack_values: {} values given for a store of {} elements",
                    values.size(), state_->numel));
  }
  auto flat = std::make_shared<std::vector<S>>(std::move(values));
  for (auto& p : state_->params) {
    auto& n = *p.tensor.node();
    n.value = std::shared_ptr<S>(flat, flat->data() + p.offset);
    n.make_value = nullptr;
  }
  state_->values = std::move(flat);
  state_->values_released = false;
}

template <class S>
bool parameter_store<S>::values_released() const {
  return state_->values_released;
}

template <class S>
void parameter_store<S>::set_grad_ready_hook(hook_type hook) const {
  state_->hook = std::move(hook);
  for (std::size_t i = 0; i < state_->params.size(); ++i) {
    install_hook<S>(*state_->params[i].tensor.node(), i, state_->hook);
  }
}

template <class S>
void parameter_store<S>::check_bound() const {
  for (const auto& p : state_->params) {
    const auto& n = *p.tensor.node();
    // Released gradients are the parameters' own allocations (or none).
    const bool grad_ok = state_->grads_released || n.grad.get() == state_->grads->data() + p.offset;
    // Released values are made where their owner puts them (or are absent).
    const bool value_ok = state_->values_released
                              ? n.make_value != nullptr
                              : n.value.get() == state_->values->data() + p.offset;
    if (!value_ok || !grad_ok) {
      throw usage_error(fmt::format(
          "ad::parameter_store: parameter '{}' was re-packed into another store (its module "
          "was added to another model?); get the store again with model.parameters() and "
          "rebuild the optimizer",
          p.name));
    }
  }
}

template class parameter_store<float>;
template class parameter_store<double>;
template basic_tensor<float> make_parameter<float>(std::string, shape);
template basic_tensor<double> make_parameter<double>(std::string, shape);

}  // namespace ringflow::ad
