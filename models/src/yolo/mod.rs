//! YOLOv8 (Ultralytics, `ultralytics/cfg/models/v8/yolov8.yaml` and `yolov8-seg.yaml`): the
//! CSPDarknet backbone with C2f blocks, SPPF, the PAN-FPN neck and the anchor-free decoupled head,
//! at the official scales n/s/m/l/x, for any number of classes. FastSAM is the YOLOv8-seg
//! architecture with one class (FastSAM-s = s scale, FastSAM-x = x scale).

pub mod c2f;
pub mod conv;
pub mod flops;
pub mod head;
pub mod predict;
pub mod prune;
pub mod sppf;

use std::fmt;
use std::str::FromStr;

use burn::module::Module;
use burn::nn::interpolate::{Interpolate2d, Interpolate2dConfig, InterpolateMode};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use c2f::C2f;
use conv::Conv;
use head::{Head, HeadOutput};
use sppf::Sppf;

/// `scales` of the official yaml: depth multiple, width multiple, max channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scale {
    N,
    S,
    M,
    L,
    X,
}

impl Scale {
    pub fn multiples(self) -> (f64, f64, usize) {
        match self {
            Scale::N => (0.33, 0.25, 1024),
            Scale::S => (0.33, 0.50, 1024),
            Scale::M => (0.67, 0.75, 768),
            Scale::L => (1.00, 1.00, 512),
            Scale::X => (1.00, 1.25, 512),
        }
    }

    fn letter(self) -> char {
        match self {
            Scale::N => 'n',
            Scale::S => 's',
            Scale::M => 'm',
            Scale::L => 'l',
            Scale::X => 'x',
        }
    }
}

/// Which head the model carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Task {
    Detect,
    Segment,
}

/// A YOLOv8-family model: `yolov8n`, `yolov8s-seg`, `fastsam-s`, ...
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct YoloConfig {
    pub scale: Scale,
    pub task: Task,
    pub num_classes: usize,
    /// Mask coefficients per anchor (`nm`).
    pub num_masks: usize,
    /// Prototype channels (`npr`).
    pub num_prototypes: usize,
    /// FastSAM's name and single class.
    pub fastsam: bool,
}

impl YoloConfig {
    pub fn yolov8(scale: Scale, task: Task, num_classes: usize) -> Self {
        Self { scale, task, num_classes, num_masks: 32, num_prototypes: 256, fastsam: false }
    }

    pub fn fastsam(scale: Scale) -> Self {
        Self { fastsam: true, ..Self::yolov8(scale, Task::Segment, 1) }
    }

    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    /// Ultralytics' `make_divisible(min(c, max_channels) * width, 8)`.
    pub fn channels(&self, c: usize) -> usize {
        let (_, width, max_channels) = self.scale.multiples();
        ((c.min(max_channels) as f64 * width) / 8.0).ceil() as usize * 8
    }

    /// Ultralytics' `max(round(n * depth), 1)`.
    pub fn depth(&self, n: usize) -> usize {
        let (depth, _, _) = self.scale.multiples();
        if n > 1 { ((n as f64 * depth).round() as usize).max(1) } else { n }
    }

    pub fn init(&self, device: &Device) -> YoloV8 {
        YoloV8::new(self, device)
    }

    /// The model PyTorch builds for this config after `torch.manual_seed(torch_seed)`: every
    /// convolution drawn from PyTorch's generator with its default initialisation, in the order
    /// Ultralytics' `parse_model` constructs them ([`crate::torch_init`]), then Ultralytics'
    /// `bias_init` constants on the box and class outputs. An Ultralytics training run with
    /// `seed=s` on one device builds its model right after `torch.manual_seed(s)` (its trainer
    /// seeds `s + 1 + RANK`, and RANK is -1 outside distributed runs), so `torch_seed = s` starts
    /// from that run's weights, to the bit (tests/train_student.rs).
    pub fn init_drawn_as_pytorch(&self, torch_seed: u64, device: &Device) -> YoloV8 {
        let mut model = self.init(device);
        model.draw_as_pytorch(&mut crate::torch_init::TorchGenerator::manual_seed(torch_seed));
        model
    }
}

impl fmt::Display for YoloConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.fastsam {
            return write!(f, "fastsam-{}", self.scale.letter());
        }
        let suffix = if self.task == Task::Segment { "-seg" } else { "" };
        write!(f, "yolov8{}{suffix}", self.scale.letter())
    }
}

impl FromStr for YoloConfig {
    type Err = String;

    /// `yolov8{n,s,m,l,x}[-seg]` (80 classes, as the official checkpoints) or `fastsam-{s,x}`.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let lower = name.trim().to_lowercase();
        let scale_of = |c: Option<char>| match c {
            Some('n') => Some(Scale::N),
            Some('s') => Some(Scale::S),
            Some('m') => Some(Scale::M),
            Some('l') => Some(Scale::L),
            Some('x') => Some(Scale::X),
            _ => None,
        };
        let unknown = || format!("unknown model '{name}': expected yolov8n|s|m|l|x, yolov8n-seg|..., fastsam-s|x");
        if let Some(rest) = lower.strip_prefix("fastsam-") {
            return match rest {
                "s" => Ok(Self::fastsam(Scale::S)),
                "x" => Ok(Self::fastsam(Scale::X)),
                _ => Err(unknown()),
            };
        }
        let rest = lower.strip_prefix("yolov8").ok_or_else(unknown)?;
        let (scale, task) = match rest.strip_suffix("-seg") {
            Some(s) => (s, Task::Segment),
            None => (rest, Task::Detect),
        };
        let mut chars = scale.chars();
        let scale = scale_of(chars.next()).filter(|_| chars.next().is_none()).ok_or_else(unknown)?;
        Ok(Self::yolov8(scale, task, 80))
    }
}

/// The model. Field order and names follow the yaml's layer list; [`LAYER_NAMES`] maps each
/// official `model.<i>` index to its field.
#[derive(Module, Debug)]
pub struct YoloV8 {
    pub stem: Conv,
    pub down_p2: Conv,
    pub c2f_p2: C2f,
    pub down_p3: Conv,
    pub c2f_p3: C2f,
    pub down_p4: Conv,
    pub c2f_p4: C2f,
    pub down_p5: Conv,
    pub c2f_p5: C2f,
    pub sppf: Sppf,
    pub top_down_p4: C2f,
    pub top_down_p3: C2f,
    pub bottom_up_down_p3: Conv,
    pub bottom_up_p4: C2f,
    pub bottom_up_down_p4: Conv,
    pub bottom_up_p5: C2f,
    pub head: Head,
    pub upsample: Interpolate2d,
}

/// `model.<i>` of the official state dict → field of [`YoloV8`] (layers 10, 11, 13, 14, 17 and 20
/// are the parameter-free upsample and concat).
pub const LAYER_NAMES: [(usize, &str); 17] = [
    (0, "stem"),
    (1, "down_p2"),
    (2, "c2f_p2"),
    (3, "down_p3"),
    (4, "c2f_p3"),
    (5, "down_p4"),
    (6, "c2f_p4"),
    (7, "down_p5"),
    (8, "c2f_p5"),
    (9, "sppf"),
    (12, "top_down_p4"),
    (15, "top_down_p3"),
    (16, "bottom_up_down_p3"),
    (18, "bottom_up_p4"),
    (19, "bottom_up_down_p4"),
    (21, "bottom_up_p5"),
    (22, "head"),
];

impl YoloV8 {
    /// Folds every BatchNorm into its convolution ([`Conv::fold_batch_norm`]) for inference: the
    /// same outputs (to float rounding) in one pass per layer instead of two. Students loaded for
    /// inference (`Detector`, `kiln infer`, `eval`, `bench`) are folded; a folded model cannot be
    /// saved as a checkpoint.
    pub fn fold_batch_norms(mut self) -> Self {
        for conv in self.convs_mut() {
            conv.fold_batch_norm();
        }
        self
    }

    /// Mixed precision for training: every `Conv` block's convolution computes in `dtype` (bf16),
    /// the weights and the rest stay float32 ([`conv::conv_in`]); None: float32 throughout.
    pub fn with_compute(mut self, dtype: Option<burn::tensor::FloatDType>) -> Self {
        for conv in self.convs_mut() {
            conv.compute = dtype;
        }
        self
    }

    /// Whether [`YoloV8::fold_batch_norms`] folded this model (it then has no checkpoint form).
    pub fn is_folded(&self) -> bool {
        self.clone().convs_mut().iter().any(|conv| conv.folded)
    }

    /// Every Ultralytics `Conv` block (convolution + BatchNorm + SiLU) of the model.
    fn convs_mut(&mut self) -> Vec<&mut Conv> {
        let mut convs = vec![
            &mut self.stem,
            &mut self.down_p2,
            &mut self.down_p3,
            &mut self.down_p4,
            &mut self.down_p5,
            &mut self.bottom_up_down_p3,
            &mut self.bottom_up_down_p4,
            &mut self.sppf.cv1,
            &mut self.sppf.cv2,
        ];
        for c2f in [
            &mut self.c2f_p2,
            &mut self.c2f_p3,
            &mut self.c2f_p4,
            &mut self.c2f_p5,
            &mut self.top_down_p4,
            &mut self.top_down_p3,
            &mut self.bottom_up_p4,
            &mut self.bottom_up_p5,
        ] {
            convs.push(&mut c2f.cv1);
            convs.push(&mut c2f.cv2);
            for bottleneck in &mut c2f.m {
                convs.push(&mut bottleneck.cv1);
                convs.push(&mut bottleneck.cv2);
            }
        }
        let head = &mut self.head;
        for branch in head.cv2.iter_mut().chain(head.cv3.iter_mut()).chain(head.cv4.iter_mut()) {
            convs.push(&mut branch.0);
            convs.push(&mut branch.1);
        }
        if let Some(proto) = &mut head.proto {
            convs.push(&mut proto.cv1);
            convs.push(&mut proto.cv2);
            convs.push(&mut proto.cv3);
        }
        convs
    }
}

impl YoloV8 {
    /// Redraws every convolution from `generator` in PyTorch's construction order: the layers in
    /// the yaml's order; in each, the submodules in the order their `__init__` creates them
    /// (C2f: cv1, cv2, then the bottlenecks; Detect: the box branches, the class branches, the
    /// DFL's fixed convolution (drawn, then overwritten with 0..15); Segment then adds Proto and
    /// the mask-coefficient branches). BatchNorm starts at 1 and 0 and takes no draws.
    fn draw_as_pytorch(&mut self, generator: &mut crate::torch_init::TorchGenerator) {
        let mut convs: Vec<&mut Conv> = vec![&mut self.stem, &mut self.down_p2];
        convs.extend(self.c2f_p2.convs_in_construction_order());
        convs.push(&mut self.down_p3);
        convs.extend(self.c2f_p3.convs_in_construction_order());
        convs.push(&mut self.down_p4);
        convs.extend(self.c2f_p4.convs_in_construction_order());
        convs.push(&mut self.down_p5);
        convs.extend(self.c2f_p5.convs_in_construction_order());
        convs.extend([&mut self.sppf.cv1, &mut self.sppf.cv2]);
        convs.extend(self.top_down_p4.convs_in_construction_order());
        convs.extend(self.top_down_p3.convs_in_construction_order());
        convs.push(&mut self.bottom_up_down_p3);
        convs.extend(self.bottom_up_p4.convs_in_construction_order());
        convs.push(&mut self.bottom_up_down_p4);
        convs.extend(self.bottom_up_p5.convs_in_construction_order());
        for conv in convs {
            draw_conv2d(&mut conv.conv, generator, BiasDraw::Drawn);
        }
        let head = &mut self.head;
        // `bias_init` sets the box and class biases after the draws: kiln's head holds them.
        for branch in head.cv2.iter_mut().chain(head.cv3.iter_mut()) {
            draw_branch(branch, generator, BiasDraw::Constant);
        }
        let dfl = head.dfl.conv.weight.dims();
        generator.conv_weight(dfl);
        if let Some(proto) = &mut head.proto {
            draw_conv2d(&mut proto.cv1.conv, generator, BiasDraw::Drawn);
            let upsample = &mut proto.upsample;
            let dims = upsample.weight.dims();
            upsample.weight = drawn(upsample.weight.clone(), generator.conv_weight(dims));
            if let Some(bias) = upsample.bias.take() {
                upsample.bias = Some(drawn(bias, generator.conv_bias(dims, dims[1])));
            }
            draw_conv2d(&mut proto.cv2.conv, generator, BiasDraw::Drawn);
            draw_conv2d(&mut proto.cv3.conv, generator, BiasDraw::Drawn);
        }
        for branch in head.cv4.iter_mut() {
            draw_branch(branch, generator, BiasDraw::Drawn);
        }
    }
}

/// Whether a convolution's bias keeps the draw or only consumes it (a constant set afterwards).
#[derive(Clone, Copy)]
enum BiasDraw {
    Drawn,
    Constant,
}

fn draw_branch(branch: &mut head::Branch, generator: &mut crate::torch_init::TorchGenerator, last_bias: BiasDraw) {
    draw_conv2d(&mut branch.0.conv, generator, BiasDraw::Drawn);
    draw_conv2d(&mut branch.1.conv, generator, BiasDraw::Drawn);
    draw_conv2d(&mut branch.2, generator, last_bias);
}

fn draw_conv2d(
    conv: &mut burn::nn::conv::Conv2d,
    generator: &mut crate::torch_init::TorchGenerator,
    bias_draw: BiasDraw,
) {
    let dims = conv.weight.dims();
    conv.weight = drawn(conv.weight.clone(), generator.conv_weight(dims));
    if let Some(bias) = conv.bias.take() {
        let values = generator.conv_bias(dims, dims[0]);
        conv.bias = Some(match bias_draw {
            BiasDraw::Drawn => drawn(bias, values),
            BiasDraw::Constant => bias,
        });
    }
}

/// `param` with `values` (row-major, its shape), on its device, keeping its id and whether it
/// trains (a new tensor on an autodiff device is not tracked until told).
fn drawn<const D: usize>(param: burn::module::Param<Tensor<D>>, values: Vec<f32>) -> burn::module::Param<Tensor<D>> {
    param.map(|tensor| {
        let (dims, tracked) = (tensor.dims(), tensor.is_require_grad());
        Tensor::from_data(burn::tensor::TensorData::new(values, dims), &tensor.device()).set_require_grad(tracked)
    })
}

impl YoloV8 {
    pub fn new(config: &YoloConfig, device: &Device) -> Self {
        let ch = |c| config.channels(c);
        let n = |d| config.depth(d);
        let (c64, c128, c256, c512, c1024) = (ch(64), ch(128), ch(256), ch(512), ch(1024));
        let head = match config.task {
            Task::Detect => Head::detect(config.num_classes, [c256, c512, c1024], device),
            Task::Segment => Head::segment(
                config.num_classes,
                config.num_masks,
                ch(config.num_prototypes),
                [c256, c512, c1024],
                device,
            ),
        };
        Self {
            stem: Conv::new(3, c64, 3, 2, 1, device),
            down_p2: Conv::new(c64, c128, 3, 2, 1, device),
            c2f_p2: C2f::new(c128, c128, n(3), true, device),
            down_p3: Conv::new(c128, c256, 3, 2, 1, device),
            c2f_p3: C2f::new(c256, c256, n(6), true, device),
            down_p4: Conv::new(c256, c512, 3, 2, 1, device),
            c2f_p4: C2f::new(c512, c512, n(6), true, device),
            down_p5: Conv::new(c512, c1024, 3, 2, 1, device),
            c2f_p5: C2f::new(c1024, c1024, n(3), true, device),
            sppf: Sppf::new(c1024, c1024, 5, device),
            top_down_p4: C2f::new(c1024 + c512, c512, n(3), false, device),
            top_down_p3: C2f::new(c512 + c256, c256, n(3), false, device),
            bottom_up_down_p3: Conv::new(c256, c256, 3, 2, 1, device),
            bottom_up_p4: C2f::new(c256 + c512, c512, n(3), false, device),
            bottom_up_down_p4: Conv::new(c512, c512, 3, 2, 1, device),
            bottom_up_p5: C2f::new(c512 + c1024, c1024, n(3), false, device),
            head,
            upsample: Interpolate2dConfig::new()
                .with_scale_factor(Some([2.0, 2.0]))
                .with_mode(InterpolateMode::Nearest)
                .init(),
        }
    }

    /// `[B, 3, H, W]` RGB in 0..1 (H, W multiples of 32) → raw head outputs.
    pub fn forward(&self, images: Tensor<4>) -> HeadOutput {
        self.forward_with_features(images).0
    }

    /// [`YoloV8::forward`], with the neck's outputs the head reads (P3, P4, P5: strides 8, 16,
    /// 32), for feature distillation.
    pub fn forward_with_features(&self, images: Tensor<4>) -> (HeadOutput, [Tensor<4>; 3]) {
        let device = images.device();
        crate::nn::on_flex_workers(&device, || self.forward_on_this_thread(images))
    }

    fn forward_on_this_thread(&self, images: Tensor<4>) -> (HeadOutput, [Tensor<4>; 3]) {
        let x = self.down_p2.forward(self.stem.forward(images));
        let x = self.c2f_p2.forward(x);
        let p3 = self.c2f_p3.forward(self.down_p3.forward(x));
        let p4 = self.c2f_p4.forward(self.down_p4.forward(p3.clone()));
        let p5 = self.sppf.forward(self.c2f_p5.forward(self.down_p5.forward(p4.clone())));

        let up = Tensor::cat(vec![self.upsample.forward(p5.clone()), p4], 1);
        let td4 = self.top_down_p4.forward(up);
        let up = Tensor::cat(vec![self.upsample.forward(td4.clone()), p3], 1);
        let out3 = self.top_down_p3.forward(up);
        let down = Tensor::cat(vec![self.bottom_up_down_p3.forward(out3.clone()), td4], 1);
        let out4 = self.bottom_up_p4.forward(down);
        let down = Tensor::cat(vec![self.bottom_up_down_p4.forward(out4.clone()), p5], 1);
        let out5 = self.bottom_up_p5.forward(down);
        let features = [out3.clone(), out4.clone(), out5.clone()];
        (self.head.forward([out3, out4, out5]), features)
    }
}

impl YoloV8 {
    /// A copy whose layers that ONNX exporters lack are replaced by equivalent exportable forms
    /// (see [`crate::lowering`]); the same function, for export only.
    pub fn lowered_for_export(&self) -> Self {
        let mut model = self.clone();
        if let Some(proto) = model.head.proto.as_mut() {
            proto.upsample_lowered = crate::lowering::StridedUpsample::from_conv_transpose(&proto.upsample);
        }
        model
    }

    /// The official key prefixes → this module's fields: `model.<i>.` of a state dict, and
    /// `model.model.<i>.` of an Ultralytics checkpoint, which pickles the whole model under `model`.
    pub fn key_prefixes() -> Vec<(String, String)> {
        let state_dict = LAYER_NAMES.iter().map(|(i, name)| (format!("model.{i}."), format!("{name}.")));
        let checkpoint = LAYER_NAMES.iter().map(|(i, name)| (format!("model.model.{i}."), format!("{name}.")));
        state_dict.chain(checkpoint).collect()
    }

    /// Saves the weights as safetensors with Ultralytics' state-dict keys (`model.<i>.…`), so the
    /// file loads back here and into Ultralytics alike; `metadata` goes into the header.
    pub fn save(
        &self,
        path: &std::path::Path,
        metadata: &[(String, String)],
    ) -> Result<(), crate::weights::WeightsError> {
        if self.is_folded() {
            // Folded weights under the official keys would have their BatchNorm applied twice.
            return Err(crate::weights::WeightsError::Write {
                path: path.to_path_buf(),
                message: "this model has its BatchNorm folded for inference and cannot be saved as a checkpoint; \
                          save the model it was folded from"
                    .into(),
            });
        }
        let prefixes: Vec<(String, String)> = Self::key_prefixes().into_iter().take(LAYER_NAMES.len()).collect();
        crate::weights::save_safetensors(self, path, &prefixes, metadata)
    }

    /// Builds `config` and loads official weights: an Ultralytics checkpoint as shipped
    /// (`yolov8n-seg.pt`, `FastSAM-s.pt`: the pickled model, read directly), or a state dict
    /// (`.pt`/`.pth` or `.safetensors`, keys `model.<i>.…`; a pruned kiln student's channel
    /// widths come from its metadata, see [`prune`]). A checkpoint of another scale, task or
    /// class count is refused with the keys that do not fit.
    pub fn load(
        config: &YoloConfig,
        path: &std::path::Path,
        device: &Device,
    ) -> Result<Self, crate::weights::WeightsError> {
        // A pruned kiln student records its channel widths: the skeleton is cut to them first.
        let skeleton = match prune::widths_in_file(path)? {
            Some(widths) => prune::with_widths(config.init(device), &widths)
                .map_err(|message| crate::weights::WeightsError::Read { path: path.to_path_buf(), message })?,
            None => config.init(device),
        };
        crate::weights::load_checkpoint(skeleton, path, &Self::key_prefixes(), &config.to_string())
    }
}

impl crate::weights::OfficialCheckpoint for YoloV8 {
    fn checkpoint_layout() -> crate::weights::CheckpointLayout {
        crate::weights::CheckpointLayout::prefixes(&Self::key_prefixes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::{Param, RunningState};
    use burn::tensor::{Distribution, FloatDType};

    fn outputs(model: &YoloV8, input: Tensor<4>) -> Vec<f32> {
        let output = model.forward(input);
        let mut tensors: Vec<Tensor<4>> = output.levels;
        tensors.extend(output.coefficients.unwrap());
        tensors.push(output.prototypes.unwrap());
        tensors.into_iter().flat_map(|t| crate::device::read_floats(t).unwrap()).collect()
    }

    #[test]
    fn folded_batch_norms_give_the_same_outputs_and_cannot_be_saved() {
        let device = Device::flex();
        device.seed(3);
        let config = "yolov8n-seg".parse::<YoloConfig>().unwrap().with_num_classes(3);
        let mut model = config.init(&device);
        // Statistics, scales and shifts that differ per channel, as after training.
        let mut count = 0;
        for conv in model.convs_mut() {
            let width = conv.bn.gamma.dims()[0];
            let random = |low, high| Tensor::<1>::random([width], Distribution::Uniform(low, high), &device);
            conv.bn.gamma = Param::from_tensor(random(0.2, 1.5));
            conv.bn.beta = Param::from_tensor(random(-1.0, 1.0));
            conv.bn.running_mean = RunningState::new(random(-0.5, 0.5));
            conv.bn.running_var = RunningState::new(random(0.5, 2.0));
            count += 1;
        }
        let norms = crate::lora::parameter_paths(&model).iter().filter(|(p, _)| p.ends_with("bn.gamma")).count();
        assert_eq!(count, norms, "every BatchNorm of the model is folded");
        let model = model.valid();
        let input = Tensor::<4>::random([1, 3, 96, 96], Distribution::Uniform(0.0, 1.0), &device);
        let before = outputs(&model, input.clone());
        let folded = model.fold_batch_norms();
        let after = outputs(&folded, input);
        let scale = before.iter().fold(0f32, |m, v| m.max(v.abs()));
        let largest = before.iter().zip(&after).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(largest <= 1e-4 * scale.max(1.0), "outputs differ by {largest} (largest output {scale})");
        let path = std::env::temp_dir().join(format!("kiln-folded-{}.safetensors", std::process::id()));
        let error = folded.save(&path, &[]).unwrap_err().to_string();
        assert!(error.contains("folded") && !path.exists(), "{error}");
    }

    /// Mixed precision's convolutions (`with_compute`): the outputs stay close to float32's (the
    /// half type's rounding, through every layer) and are not float32's (the half path ran).
    #[test]
    fn half_precision_convolutions_stay_close_to_float32() {
        let device = Device::flex();
        device.seed(3);
        let model = "yolov8n-seg".parse::<YoloConfig>().unwrap().with_num_classes(3).init(&device).valid();
        let input = Tensor::<4>::random([1, 3, 64, 64], Distribution::Uniform(0.0, 1.0), &device);
        let reference = outputs(&model, input.clone());
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        for dtype in [FloatDType::BF16, FloatDType::F16] {
            let half = outputs(&model.clone().with_compute(Some(dtype)), input.clone());
            let largest = reference.iter().zip(&half).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            eprintln!("{dtype:?}: largest difference {largest} of outputs up to {scale}");
            assert!(largest > 0.0, "{dtype:?}: the half path did not run");
            assert!(largest <= 0.05 * scale, "{dtype:?}: outputs differ by {largest} (largest output {scale})");
        }
    }
}
