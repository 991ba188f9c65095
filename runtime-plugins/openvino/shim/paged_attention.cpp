// The one piece of OpenVINO the C API lacks: the SDPA -> PagedAttention model
// transformation (what Python's `paged_attention_transformation` and GenAI's
// continuous batching run). A paged IR cannot be saved and read back (the IR
// reader has no PagedAttentionExtension, and exported blobs drop the node's
// rt_info), so slinfer-openvino applies it to the stateful IR at load time.
//
// It also merges the projections that read the same input (see
// merge_parallel_matmuls), which the CPU plugin does not do for compressed
// weights in f32.
//
// Built by build.rs into a small shared library against the openvino wheel's
// headers and dlopen'ed at run time after libopenvino_c.
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <vector>

#include "openvino/core/model.hpp"
#include "openvino/op/concat.hpp"
#include "openvino/op/constant.hpp"
#include "openvino/op/convert.hpp"
#include "openvino/op/gather.hpp"
#include "openvino/op/matmul.hpp"
#include "openvino/op/multiply.hpp"
#include "openvino/op/parameter.hpp"
#include "openvino/op/reshape.hpp"
#include "openvino/op/result.hpp"
#include "openvino/op/subtract.hpp"
#include "openvino/op/variadic_split.hpp"
#include "openvino/pass/sdpa_to_paged_attention.hpp"

// Compute logits only for the rows the caller samples (as GenAI's
// apply_gather_before_matmul_transformation does): a Gather on the token axis
// of the hidden states before the final MatMul, fed by a new input
// `sampled_tokens_indices` [?] i64. Without it a prefill of N tokens makes N
// vocab-sized rows. The gathered rows (the final norm's output) are also a
// second output, `hidden_states`, that embeddings are pooled from. Returns
// whether it applied (only the plain MatMul -> Result shape is recognised).
static bool gather_before_lm_head(const std::shared_ptr<ov::Model>& model) {
    if (model->get_results().size() != 1) return false;
    auto last = model->get_results()[0]->input_value(0).get_node_shared_ptr();
    auto matmul = ov::as_type_ptr<ov::op::v0::MatMul>(last);
    if (!matmul || matmul->get_transpose_a()) return false;
    auto hidden = matmul->input_value(0);
    if (hidden.get_partial_shape().rank().is_dynamic()) return false;
    auto indices = std::make_shared<ov::op::v0::Parameter>(ov::element::i64, ov::PartialShape{-1});
    indices->set_friendly_name("sampled_tokens_indices");
    indices->output(0).get_tensor().set_names({"sampled_tokens_indices"});
    auto axis = ov::op::v0::Constant::create(ov::element::i64, ov::Shape{}, {0});
    auto gather = std::make_shared<ov::op::v8::Gather>(hidden, indices, axis);
    matmul->input(0).replace_source_output(gather);
    model->add_parameters({indices});
    gather->output(0).get_tensor().set_names({"hidden_states"});
    model->add_results({std::make_shared<ov::op::v0::Result>(gather)});
    return true;
}

// The weights of a MatMul in the compressed form the CPU plugin turns into
// one FullyConnectedCompressed node:
//   Convert(Reshape(Multiply(Subtract(Convert(W), Convert(ZP)), SCALE)))
// with W [N, groups, group] and ZP, SCALE [N, groups, 1] constants.
struct Compressed {
    std::shared_ptr<ov::op::v0::MatMul> matmul;
    std::shared_ptr<ov::op::v0::Constant> w, zp, scale;
    ov::element::Type deq_type, out_type;
    int64_t n, k;
};

template <class T>
static std::shared_ptr<T> input_as(const std::shared_ptr<ov::Node>& node, size_t i) {
    return ov::as_type_ptr<T>(node->input_value(i).get_node_shared_ptr());
}

static bool compressed(const std::shared_ptr<ov::op::v0::MatMul>& mm, Compressed& c) {
    if (mm->get_transpose_a() || !mm->get_transpose_b()) return false;
    auto out = input_as<ov::op::v0::Convert>(mm, 1);
    auto reshape = out ? input_as<ov::op::v1::Reshape>(out, 0) : nullptr;
    auto mul = reshape ? input_as<ov::op::v1::Multiply>(reshape, 0) : nullptr;
    auto sub = mul ? input_as<ov::op::v1::Subtract>(mul, 0) : nullptr;
    auto scale = mul ? input_as<ov::op::v0::Constant>(mul, 1) : nullptr;
    auto wc = sub ? input_as<ov::op::v0::Convert>(sub, 0) : nullptr;
    auto zc = sub ? input_as<ov::op::v0::Convert>(sub, 1) : nullptr;
    auto w = wc ? input_as<ov::op::v0::Constant>(wc, 0) : nullptr;
    auto zp = zc ? input_as<ov::op::v0::Constant>(zc, 0) : nullptr;
    if (!scale || !w || !zp) return false;
    const auto& shape = reshape->get_output_partial_shape(0);
    // is_dynamic first: get_length() of a dynamic rank throws.
    if (shape.is_dynamic() || shape.rank().get_length() != 2 || w->get_shape().size() != 3 ||
        zp->get_shape().size() != 3 || scale->get_shape().size() != 3)
        return false;
    c = {mm, w, zp, scale, wc->get_destination_type(), out->get_destination_type(),
         shape[0].get_length(), shape[1].get_length()};
    return true;
}

// Whether every consumer of the MatMul's output only reshapes it. An
// elementwise consumer (the MLP's Swish and Multiply) is fused into the
// FullyConnected node by the CPU plugin, which a split in between prevents.
static bool only_reshaped(const std::shared_ptr<ov::op::v0::MatMul>& mm) {
    for (const auto& in : mm->output(0).get_target_inputs())
        if (!ov::as_type<ov::op::v1::Reshape>(in.get_node())) return false;
    return true;
}

// Merge the compressed MatMuls that read the same input and whose outputs are
// only reshaped (a layer's Q, K and V projections) into one MatMul over their
// concatenated weights, split after: fewer, larger FullyConnected nodes, each
// output channel computed as before. Measured on SmolLM2-135M (f32, Intel
// Xeon, 2 cores): single-sequence decode steps 1.03-1.15x faster, greedy
// tokens unchanged; merging the MLP's gate and up projections too was
// slower than Q, K and V alone (the split keeps Swish and Multiply out of
// the FullyConnected nodes). Returns how many groups were merged.
static int merge_parallel_matmuls(const std::shared_ptr<ov::Model>& model) {
    std::map<std::pair<ov::Node*, size_t>, std::vector<Compressed>> groups;
    for (const auto& node : model->get_ordered_ops()) {
        auto mm = ov::as_type_ptr<ov::op::v0::MatMul>(node);
        Compressed c;
        if (!mm || !only_reshaped(mm) || !compressed(mm, c)) continue;
        auto in = mm->input_value(0);
        groups[{in.get_node(), in.get_index()}].push_back(c);
    }
    int merged = 0;
    for (auto& [_, group] : groups) {
        if (group.size() < 2) continue;
        const auto& first = group.front();
        bool alike = true;
        for (const auto& c : group) {
            alike = alike && c.k == first.k && c.deq_type == first.deq_type && c.out_type == first.out_type &&
                    c.w->get_element_type() == first.w->get_element_type() &&
                    c.zp->get_element_type() == first.zp->get_element_type() &&
                    c.scale->get_element_type() == first.scale->get_element_type() &&
                    c.w->get_shape()[1] == first.w->get_shape()[1] && c.w->get_shape()[2] == first.w->get_shape()[2];
        }
        if (!alike) continue;
        ov::OutputVector ws, zps, scales;
        std::vector<int64_t> ns;
        int64_t total = 0;
        for (const auto& c : group) {
            ws.push_back(c.w);
            zps.push_back(c.zp);
            scales.push_back(c.scale);
            ns.push_back(c.n);
            total += c.n;
        }
        auto w = std::make_shared<ov::op::v0::Convert>(std::make_shared<ov::op::v0::Concat>(ws, 0), first.deq_type);
        auto zp = std::make_shared<ov::op::v0::Convert>(std::make_shared<ov::op::v0::Concat>(zps, 0), first.deq_type);
        auto deq = std::make_shared<ov::op::v1::Multiply>(std::make_shared<ov::op::v1::Subtract>(w, zp),
                                                          std::make_shared<ov::op::v0::Concat>(scales, 0));
        auto shape = ov::op::v0::Constant::create(ov::element::i64, ov::Shape{2}, {total, first.k});
        auto weights = std::make_shared<ov::op::v0::Convert>(std::make_shared<ov::op::v1::Reshape>(deq, shape, false),
                                                             first.out_type);
        auto mm = std::make_shared<ov::op::v0::MatMul>(first.matmul->input_value(0), weights, false, true);
        auto axis = ov::op::v0::Constant::create(ov::element::i64, ov::Shape{}, {-1});
        auto lengths = ov::op::v0::Constant::create(ov::element::i64, ov::Shape{ns.size()}, ns);
        auto split = std::make_shared<ov::op::v1::VariadicSplit>(mm, axis, lengths);
        for (size_t i = 0; i < group.size(); ++i) group[i].matmul->output(0).replace(split->output(i));
        ++merged;
    }
    return merged;
}

// Layout of the C API's handle (src/bindings/c/src/common.h): one shared_ptr.
struct ov_model {
    std::shared_ptr<ov::Model> object;
};

// Transforms `model` in place; `*merged` is set to the number of projection
// groups merged. Returns 0, or 1 with a message in `err`.
extern "C" int slinfer_ov_paged_attention(ov_model* model, int* merged, char* err, size_t err_len) {
    try {
        if (model == nullptr || !model->object) {
            std::strncpy(err, "null model", err_len);
            return 1;
        }
        auto pass = std::make_shared<ov::pass::SDPAToPagedAttention>(false, false);
        pass->run_on_model(model->object);
        gather_before_lm_head(model->object);
        *merged = merge_parallel_matmuls(model->object);
        model->object->validate_nodes_and_infer_types();
        return 0;
    } catch (const std::exception& e) {
        std::strncpy(err, e.what(), err_len);
    } catch (...) {
        std::strncpy(err, "unknown C++ exception", err_len);
    }
    if (err_len > 0) err[err_len - 1] = 0;
    return 1;
}
