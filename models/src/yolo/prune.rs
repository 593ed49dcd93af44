//! Structured channel pruning of a YOLOv8 student: whole output channels of a `Conv` (its
//! convolution filters and BatchNorm entries) are removed together with the matching input channels
//! of the layers that read them, so the result is a smaller dense model with the official block
//! layout, names and keys; only channel counts change.
//!
//! Prunable groups are the outputs of every `Conv` that no residual addition or chunk ties to
//! another layer: the stem and the down-sampling convolutions, each C2f bottleneck's hidden
//! channels, SPPF's hidden channels and output, the hidden channels of every head branch and of
//! the mask prototypes, and each C2f's output (its `cv2`, read by the next convolution, by a
//! neck concatenation at an offset and by the head). What stays whole: each C2f's `cv1` (its two
//! chunks must stay equal, and in the backbone the second one is added to every bottleneck's
//! output) and the bottleneck outputs tied to it, and the head's output layers.
//!
//! Criterion: the BatchNorm scale |γ| (Network Slimming, Liu et al. 2017): a channel whose γ is
//! near 0 outputs nearly the constant SiLU(β), so removing it changes the network least, and that
//! constant is folded into the readers (their BatchNorm running mean, or bias) so the pruned model
//! starts close to the original. γ is not comparable across layers without sparsity training, so
//! every group keeps the same share of its channels (the global ratio), ranked by |γ| inside it.
//!
//! The kept widths are recorded in the weights file's metadata (`kiln.widths`), from which
//! [`crate::YoloV8::load`] rebuilds the pruned architecture.

use std::collections::BTreeMap;

use burn::module::{Param, RunningState};
use burn::nn::BatchNorm;
use burn::nn::conv::{Conv2d, ConvTranspose2d};
use burn::tensor::activation::silu;
use burn::tensor::{Int, Tensor, TensorData};

use super::YoloV8;
use super::conv::Conv;
use super::head::Head;

/// Kept output channels per prunable group, by name (`down_p3`, `c2f_p4.m.0`, `head.cv3.1.0`, ...).
pub type Widths = BTreeMap<String, usize>;

/// The weights file's metadata key holding a pruned model's [`Widths`] as JSON.
pub const WIDTHS_KEY: &str = "kiln.widths";

/// A layer that reads a group's channels.
enum Reader<'a> {
    /// A convolution reading the group at each of `offsets` of its input (SPPF reads its hidden
    /// channels four times, concatenated); the constant of a removed channel goes into its
    /// BatchNorm's running mean, or into its bias.
    Conv { conv: &'a mut Conv2d, norm: Option<&'a mut BatchNorm>, offsets: Vec<usize> },
    /// The prototypes' transposed convolution (weights `[in, out, k, k]`).
    Transposed(&'a mut ConvTranspose2d),
}

fn reader<'a>(conv: &'a mut Conv) -> Reader<'a> {
    reader_at(conv, 0)
}

/// A `Conv` reading the group at `offset` of its concatenated input.
fn reader_at<'a>(conv: &'a mut Conv, offset: usize) -> Reader<'a> {
    Reader::Conv { conv: &mut conv.conv, norm: Some(&mut conv.bn), offsets: vec![offset] }
}

fn width(conv: &Conv) -> usize {
    conv.bn.gamma.dims()[0]
}

/// The first layer of every head branch of `level` (and the prototypes, which read level 0).
fn head_readers(head: &mut Head, level: usize) -> Vec<Reader<'_>> {
    let Head { cv2, cv3, cv4, proto, .. } = head;
    let mut readers = vec![reader(&mut cv2[level].0), reader(&mut cv3[level].0)];
    if let Some(branch) = cv4.get_mut(level) {
        readers.push(reader(&mut branch.0));
    }
    if let (0, Some(proto)) = (level, proto.as_mut()) {
        readers.push(reader(&mut proto.cv1));
    }
    readers
}

/// Calls `visit` with every prunable group of `model`: its name, the producing `Conv` and its readers.
fn for_each_group(model: &mut YoloV8, visit: &mut dyn FnMut(String, &mut Conv, Vec<Reader<'_>>)) {
    let m = model;
    visit("stem".into(), &mut m.stem, vec![reader(&mut m.down_p2)]);
    visit("down_p2".into(), &mut m.down_p2, vec![reader(&mut m.c2f_p2.cv1)]);
    visit("down_p3".into(), &mut m.down_p3, vec![reader(&mut m.c2f_p3.cv1)]);
    visit("down_p4".into(), &mut m.down_p4, vec![reader(&mut m.c2f_p4.cv1)]);
    visit("down_p5".into(), &mut m.down_p5, vec![reader(&mut m.c2f_p5.cv1)]);
    // Concatenated first, before the top-down feature: offset 0 of the next C2f's input.
    visit("bottom_up_down_p3".into(), &mut m.bottom_up_down_p3, vec![reader(&mut m.bottom_up_p4.cv1)]);
    visit("bottom_up_down_p4".into(), &mut m.bottom_up_down_p4, vec![reader(&mut m.bottom_up_p5.cv1)]);
    for (name, c2f) in [
        ("c2f_p2", &mut m.c2f_p2),
        ("c2f_p3", &mut m.c2f_p3),
        ("c2f_p4", &mut m.c2f_p4),
        ("c2f_p5", &mut m.c2f_p5),
        ("top_down_p4", &mut m.top_down_p4),
        ("top_down_p3", &mut m.top_down_p3),
        ("bottom_up_p4", &mut m.bottom_up_p4),
        ("bottom_up_p5", &mut m.bottom_up_p5),
    ] {
        for (i, block) in c2f.m.iter_mut().enumerate() {
            visit(format!("{name}.m.{i}"), &mut block.cv1, vec![reader(&mut block.cv2)]);
        }
    }
    let hidden = m.sppf.cv1.bn.gamma.dims()[0];
    let sppf_reader = Reader::Conv {
        conv: &mut m.sppf.cv2.conv,
        norm: Some(&mut m.sppf.cv2.bn),
        offsets: (0..4).map(|k| k * hidden).collect(),
    };
    visit("sppf".into(), &mut m.sppf.cv1, vec![sppf_reader]);
    for (name, branches) in [("cv2", &mut m.head.cv2), ("cv3", &mut m.head.cv3), ("cv4", &mut m.head.cv4)] {
        for (level, branch) in branches.iter_mut().enumerate() {
            visit(format!("head.{name}.{level}.0"), &mut branch.0, vec![reader(&mut branch.1)]);
            let last = Reader::Conv { conv: &mut branch.2, norm: None, offsets: vec![0] };
            visit(format!("head.{name}.{level}.1"), &mut branch.1, vec![last]);
        }
    }
    if let Some(proto) = m.head.proto.as_mut() {
        visit("head.proto.cv1".into(), &mut proto.cv1, vec![Reader::Transposed(&mut proto.upsample)]);
        visit("head.proto.cv2".into(), &mut proto.cv2, vec![reader(&mut proto.cv3)]);
    }
    // The C2f and SPPF outputs: read by the next convolution, by a concatenation (at an offset
    // that is the current width of what is concatenated before them) and by the head. Offsets are
    // taken just before each visit, so groups pruned earlier are accounted for.
    visit("c2f_p2.cv2".into(), &mut m.c2f_p2.cv2, vec![reader(&mut m.down_p3)]);
    let offset = width(&m.top_down_p4.cv2);
    visit(
        "c2f_p3.cv2".into(),
        &mut m.c2f_p3.cv2,
        vec![reader(&mut m.down_p4), reader_at(&mut m.top_down_p3.cv1, offset)],
    );
    let offset = width(&m.sppf.cv2);
    visit(
        "c2f_p4.cv2".into(),
        &mut m.c2f_p4.cv2,
        vec![reader(&mut m.down_p5), reader_at(&mut m.top_down_p4.cv1, offset)],
    );
    visit("c2f_p5.cv2".into(), &mut m.c2f_p5.cv2, vec![reader(&mut m.sppf.cv1)]);
    let offset = width(&m.bottom_up_down_p4);
    visit(
        "sppf.cv2".into(),
        &mut m.sppf.cv2,
        vec![reader(&mut m.top_down_p4.cv1), reader_at(&mut m.bottom_up_p5.cv1, offset)],
    );
    let offset = width(&m.bottom_up_down_p3);
    visit(
        "top_down_p4.cv2".into(),
        &mut m.top_down_p4.cv2,
        vec![reader(&mut m.top_down_p3.cv1), reader_at(&mut m.bottom_up_p4.cv1, offset)],
    );
    let mut readers = head_readers(&mut m.head, 0);
    readers.push(reader(&mut m.bottom_up_down_p3));
    visit("top_down_p3.cv2".into(), &mut m.top_down_p3.cv2, readers);
    let mut readers = head_readers(&mut m.head, 1);
    readers.push(reader(&mut m.bottom_up_down_p4));
    visit("bottom_up_p4.cv2".into(), &mut m.bottom_up_p4.cv2, readers);
    visit("bottom_up_p5.cv2".into(), &mut m.bottom_up_p5.cv2, head_readers(&mut m.head, 2));
}

fn indices(keep: &[usize], device: &burn::tensor::Device) -> Tensor<1, Int> {
    let values: Vec<i64> = keep.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(values, [keep.len()]), device)
}

fn select_param<const D: usize>(param: &Param<Tensor<D>>, dim: usize, keep: &Tensor<1, Int>) -> Param<Tensor<D>> {
    let require_grad = param.is_require_grad();
    // A new leaf: on an autodiff device the selection is not one, and a parameter must be.
    Param::from_tensor(param.val().select(dim, keep.clone()).detach()).set_require_grad(require_grad)
}

fn select_norm(norm: &mut BatchNorm, keep: &Tensor<1, Int>) {
    norm.gamma = select_param(&norm.gamma, 0, keep);
    norm.beta = select_param(&norm.beta, 0, keep);
    norm.running_mean = RunningState::new(norm.running_mean.value().select(0, keep.clone()).detach());
    norm.running_var = RunningState::new(norm.running_var.value().select(0, keep.clone()).detach());
}

/// Keeps the channels `keep` (ascending) of `producer`; with `compensate`, what the removed ones
/// contributed (their constant SiLU(β) through each reader's weights) is folded into the readers.
fn keep_channels(producer: &mut Conv, readers: Vec<Reader<'_>>, keep: &[usize], compensate: bool) {
    let width = producer.bn.gamma.dims()[0];
    let device = producer.bn.gamma.val().device();
    let removed: Vec<usize> = (0..width).filter(|c| keep.binary_search(c).is_err()).collect();
    // The constant each removed channel outputs when its scale is (near) zero.
    let constant = silu(producer.bn.beta.val());
    let kept = indices(keep, &device);
    producer.conv.weight = select_param(&producer.conv.weight, 0, &kept);
    select_norm(&mut producer.bn, &kept);
    for reader in readers {
        match reader {
            Reader::Conv { conv, norm, offsets } => {
                let inputs = conv.weight.dims()[1];
                if compensate && !removed.is_empty() {
                    // [out, in, k, k] summed over the kernel, times the removed inputs' constants.
                    let [out, _, _, _] = conv.weight.dims();
                    let taps = conv.weight.val().sum_dim(3).sum_dim(2).reshape([out, inputs]);
                    let mut shift = Tensor::<1>::zeros([out], &device);
                    for &offset in &offsets {
                        let columns: Vec<usize> = removed.iter().map(|c| offset + c).collect();
                        let weights = taps.clone().select(1, indices(&columns, &device));
                        let constants = constant.clone().select(0, indices(&removed, &device));
                        shift = shift + weights.matmul(constants.reshape([removed.len(), 1])).reshape([out]);
                    }
                    match norm {
                        Some(norm) => {
                            norm.running_mean = RunningState::new((norm.running_mean.value() - shift).detach());
                        }
                        None => {
                            if let Some(bias) = &conv.bias {
                                let require_grad = bias.is_require_grad();
                                conv.bias = Some(
                                    Param::from_tensor((bias.val() + shift).detach()).set_require_grad(require_grad),
                                );
                            }
                        }
                    }
                }
                let kept_inputs: Vec<usize> = (0..inputs)
                    .filter(|i| {
                        !offsets.iter().any(|&o| *i >= o && *i < o + width && removed.binary_search(&(i - o)).is_ok())
                    })
                    .collect();
                conv.weight = select_param(&conv.weight, 1, &indices(&kept_inputs, &device));
            }
            Reader::Transposed(conv) => {
                conv.weight = select_param(&conv.weight, 0, &kept);
                conv.channels[0] = keep.len();
            }
        }
    }
}

/// Every prunable group's current width.
pub fn widths(model: &YoloV8) -> Widths {
    let mut copy = model.clone();
    let mut widths = Widths::new();
    for_each_group(&mut copy, &mut |name, producer, _| {
        widths.insert(name, producer.bn.gamma.dims()[0]);
    });
    widths
}

/// How many of `width` channels a group keeps when `ratio` of them go: the nearest multiple of
/// `multiple` to `width * (1 - ratio)`, at least one multiple (or the whole group when it is
/// narrower), at most the whole group.
pub fn kept_width(width: usize, ratio: f64, multiple: usize) -> usize {
    let multiple = multiple.max(1);
    let target = width as f64 * (1.0 - ratio);
    let rounded = ((target / multiple as f64).round() as usize).max(1) * multiple;
    rounded.min(width).max(1)
}

/// `model` with `ratio` (0..1) of every prunable group's channels removed, those of the smallest
/// BatchNorm |γ|, their constant outputs folded into the readers; and the widths it kept. Each
/// kept width is rounded to a multiple of `multiple` ([`kept_width`]): convolution kernels work
/// on blocks of channels (ONNX Runtime's CPU layout pads channels to 16 with AVX-512, 8 with
/// AVX2), so a width between two multiples costs as much as the next one up.
pub fn prune(model: &YoloV8, ratio: f64, multiple: usize) -> Result<(YoloV8, Widths), String> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(format!("the pruning ratio {ratio} must be in 0..1"));
    }
    if multiple == 0 {
        return Err("the channel multiple of a pruned width must be at least 1".into());
    }
    let mut pruned = model.clone();
    let mut widths = Widths::new();
    for_each_group(&mut pruned, &mut |name, producer, readers| {
        let scales: Vec<f32> =
            producer.bn.gamma.val().abs().into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
        let width = scales.len();
        let count = kept_width(width, ratio, multiple);
        let mut order: Vec<usize> = (0..width).collect();
        order.sort_by(|&a, &b| scales[b].total_cmp(&scales[a]).then(a.cmp(&b)));
        let mut keep = order[..count].to_vec();
        keep.sort_unstable();
        keep_channels(producer, readers, &keep, true);
        widths.insert(name, count);
    });
    Ok((pruned, widths))
}

/// `model`'s architecture cut to `widths` (the first channels of each group kept): the skeleton
/// a pruned weights file loads into. Unknown groups and widths beyond the model are errors.
pub fn with_widths(model: YoloV8, widths: &Widths) -> Result<YoloV8, String> {
    let full = self::widths(&model);
    for (name, &width) in widths {
        match full.get(name) {
            None => return Err(format!("`{name}` is not a prunable group of this model")),
            Some(&available) if width == 0 || width > available => {
                return Err(format!("`{name}` keeps {width} channels; the model has 1..={available}"));
            }
            _ => {}
        }
    }
    let mut model = model;
    for_each_group(&mut model, &mut |name, producer, readers| {
        if let Some(&width) = widths.get(&name) {
            let keep: Vec<usize> = (0..width).collect();
            keep_channels(producer, readers, &keep, false);
        }
    });
    Ok(model)
}

/// The widths a safetensors file records (a pruned student); `None` for any other checkpoint.
pub fn widths_in_file(path: &std::path::Path) -> Result<Option<Widths>, crate::weights::WeightsError> {
    if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) || !path.is_file() {
        return Ok(None);
    }
    // An unreadable header is the loader's to report, with its own words.
    let Ok(metadata) = crate::weights::read_safetensors_metadata(path) else { return Ok(None) };
    metadata
        .get(WIDTHS_KEY)
        .map(|json| {
            serde_json::from_str(json).map_err(|e| crate::weights::WeightsError::Read {
                path: path.to_path_buf(),
                message: format!("bad `{WIDTHS_KEY}` in its metadata: {e}"),
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    use super::*;
    use crate::yolo::YoloConfig;

    fn images(device: &Device) -> Tensor<4> {
        Tensor::random([1, 3, 64, 64], Distribution::Uniform(0.0, 1.0), device)
    }

    /// yolov8n-seg with BatchNorm statistics, shifts and scales that differ per channel, as after
    /// training.
    fn trained_like() -> (YoloV8, YoloConfig) {
        let device = Device::flex();
        device.seed(7);
        let config: YoloConfig = "yolov8n-seg".parse::<YoloConfig>().unwrap().with_num_classes(3);
        let mut model = config.init(&device);
        for_each_group(&mut model, &mut |_, producer, _| {
            let width = producer.bn.gamma.dims()[0];
            let random = |low, high| Tensor::<1>::random([width], Distribution::Uniform(low, high), &device);
            producer.bn.gamma = Param::from_tensor(random(0.2, 1.5));
            producer.bn.beta = Param::from_tensor(random(-1.0, 1.0));
            producer.bn.running_mean = RunningState::new(random(-0.5, 0.5));
            producer.bn.running_var = RunningState::new(random(0.5, 2.0));
        });
        (model, config)
    }

    fn head_values(model: &YoloV8, input: Tensor<4>) -> Vec<f32> {
        let output = model.forward(input);
        let mut values = Vec::new();
        for t in output.levels.into_iter().chain(output.coefficients.unwrap()) {
            values.extend(t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
        }
        values.extend(output.prototypes.unwrap().into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
        values
    }

    fn max_difference(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn a_pruned_student_saves_and_reloads_to_the_same_outputs() {
        let (model, config) = trained_like();
        let device = Device::flex();
        let (pruned, widths) = prune(&model, 0.3, 1).unwrap();
        let before = super::widths(&model);
        assert_eq!(widths.len(), before.len());
        assert_eq!(widths, super::widths(&pruned));
        for (name, &kept) in &widths {
            assert_eq!(kept, (before[name] as f64 * 0.7).round() as usize, "{name}");
        }
        let (full, cut) = (model.cost(640, 640).flops, pruned.cost(640, 640).flops);
        assert!(cut < 0.8 * full, "GFLOPs {:.2} -> {:.2}", full / 1e9, cut / 1e9);

        let path = std::env::temp_dir().join(format!("kiln-pruned-{}.safetensors", std::process::id()));
        let metadata = vec![(WIDTHS_KEY.to_string(), serde_json::to_string(&widths).unwrap())];
        pruned.save(&path, &metadata).unwrap();
        assert_eq!(widths_in_file(&path).unwrap().as_ref(), Some(&widths));
        let reloaded = YoloV8::load(&config, &path, &device).unwrap();
        let input = images(&device);
        let difference = max_difference(&head_values(&pruned, input.clone()), &head_values(&reloaded, input));
        assert_eq!(difference, 0.0, "the reloaded pruned model computes what the pruned module computes");
        // Without its widths the file does not fit the full architecture: refused, not misread.
        let full = crate::weights::load_checkpoint(config.init(&device), &path, &YoloV8::key_prefixes(), "x");
        let _ = std::fs::remove_file(&path);
        let error = full.err().expect("a pruned file does not load into the full model").to_string();
        assert!(error.contains("shape") || error.contains("Mismatch") || error.contains("mis"), "{error}");
    }

    #[test]
    fn the_smallest_scales_go_and_their_constant_output_is_kept() {
        // Groups whose readers are all 1x1 convolutions (where a removed channel's constant is
        // folded in exactly; a 3x3 reader's zero padding makes it exact only inside the image):
        // a head branch's hidden layer (read by a convolution with a bias), SPPF's output (read
        // after the upsample at offset 0 and in the last concatenation behind the down-sampled
        // P4) and a C2f output read by two concatenations at different offsets.
        for name in ["head.cv2.0.1", "sppf.cv2", "top_down_p4.cv2"] {
            let (mut model, _) = trained_like();
            let device = Device::flex();
            let input = images(&device);
            // Channels 3 and 9 of the group get scale 0.
            for_each_group(&mut model, &mut |group, producer, _| {
                if group == name {
                    let width = producer.bn.gamma.dims()[0];
                    let scales: Vec<f32> =
                        (0..width).map(|c| if c == 3 || c == 9 { 0.0 } else { 1.0 + c as f32 }).collect();
                    producer.bn.gamma =
                        Param::from_tensor(Tensor::from_data(TensorData::new(scales, [width]), &device));
                }
            });
            let reference = head_values(&model, input.clone());
            let mut pruned = model.clone();
            let (mut kept, mut width) = (Vec::new(), 0);
            for_each_group(&mut pruned, &mut |group, producer, readers| {
                if group == name {
                    width = producer.bn.gamma.dims()[0];
                    let scales: Vec<f32> = producer.bn.gamma.val().into_data().convert::<f32>().try_into_vec().unwrap();
                    let mut order: Vec<usize> = (0..width).collect();
                    order.sort_by(|&a, &b| scales[b].total_cmp(&scales[a]));
                    kept = order[..width - 2].to_vec();
                    kept.sort_unstable();
                    keep_channels(producer, readers, &kept, true);
                }
            });
            assert!(!kept.contains(&3) && !kept.contains(&9) && kept.len() == width - 2, "{name}: {kept:?}");
            assert_eq!(super::widths(&pruned)[name], width - 2, "{name}");
            let difference = max_difference(&reference, &head_values(&pruned, input));
            assert!(difference < 1e-4, "{name}: removing zero-scale channels changes the outputs by {difference}");
        }
    }

    #[test]
    fn kept_widths_are_rounded_to_the_channel_multiple() {
        assert_eq!(kept_width(64, 0.3, 16), 48); // 44.8
        assert_eq!(kept_width(128, 0.3, 16), 96); // 89.6
        assert_eq!(kept_width(256, 0.3, 16), 176); // 179.2
        assert_eq!(kept_width(32, 0.3, 16), 16); // 22.4: nearer 16 than 32
        assert_eq!(kept_width(16, 0.3, 16), 16); // at least one multiple
        assert_eq!(kept_width(12, 0.3, 16), 12); // never more than the group
        assert_eq!(kept_width(64, 0.3, 1), 45);
        let (model, _) = trained_like();
        let (pruned, widths) = prune(&model, 0.3, 16).unwrap();
        assert_eq!(widths, super::widths(&pruned));
        assert!(widths.values().all(|w| w % 16 == 0), "{widths:?}");
        assert!(prune(&model, 0.3, 0).is_err() && prune(&model, 1.0, 16).is_err());
    }

    #[test]
    fn widths_that_do_not_fit_are_refused() {
        let (model, _) = trained_like();
        let unknown = Widths::from([("neck".to_string(), 8)]);
        assert!(with_widths(model.clone(), &unknown).unwrap_err().contains("`neck` is not a prunable group"));
        let too_wide = Widths::from([("down_p3".to_string(), 10_000)]);
        assert!(with_widths(model, &too_wide).unwrap_err().contains("keeps 10000 channels"));
    }
}
