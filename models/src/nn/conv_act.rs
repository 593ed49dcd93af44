//! A convolution whose output loop adds the bias and applies the activation: the inference form of
//! every Ultralytics `Conv` once its BatchNorm is folded (Conv2d + bias + SiLU), and of the heads'
//! last `nn.Conv2d` (Conv2d + bias).
//!
//! Why: on Burn flex, `silu(conv2d(x))` walks the output three times (the convolution's own bias
//! pass, then a sigmoid and a product, each on one thread calling libm's `expf` per value), and
//! flex's im2col convolution converts the input to NHWC and scatters each tile back to NCHW on
//! top. Here each block of output columns is built (im2col, NCHW, no layout change), multiplied
//! (the `gemm` crate flex itself uses, AVX-512 where the CPU has it) straight into the NCHW output,
//! and finished (bias + SiLU, vectorised) while it is still in cache, blocks spread over all cores.
//!
//! On CPUs with AVX-512 every convolution but the 1x1 ones runs the direct kernel instead (`flex`'s
//! `direct`: no im2col, the input read in place from one padded copy), which the tests check
//! against Burn's as they check im2col.
//!
//! Nothing here knows a model: any float32 Conv2d with one group and no dilation qualifies. Under
//! autodiff (training) a convolution without activation runs the kernel forward and kiln's own
//! backward pass (`flex::backward`). Every other case (another backend, autodiff with SiLU in the
//! output loop, bf16, groups, dilation) runs Burn's `conv2d` and the activation, the path the
//! outputs and gradients are tested against (`tests` below, `training/tests/fused_conv_training.rs`).

// The vectorised SiLU and exp serve the flex kernels only; a build without flex leaves them unused.
#![cfg_attr(not(feature = "flex"), allow(dead_code))]

use std::sync::atomic::{AtomicU8, Ordering};

use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

/// What follows the convolution and its bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Silu,
}

/// 0: not read yet, 1: on, 2: off.
static FLEX_KERNELS: AtomicU8 = AtomicU8::new(0);

/// Whether flex runs kiln's own kernels (this convolution, [`super::silu`]): on unless
/// `KILN_FLEX_KERNELS=0` (to compare with Burn's path, or to rule them out when a result looks
/// wrong) or [`set_flex_kernels`] said otherwise.
pub fn flex_kernels() -> bool {
    match FLEX_KERNELS.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("KILN_FLEX_KERNELS").map_or(true, |v| v != "0");
            FLEX_KERNELS.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
        state => state == 1,
    }
}

/// Switches kiln's flex kernels on or off for the whole process (benches compare the two paths
/// in one run).
pub fn set_flex_kernels(on: bool) {
    FLEX_KERNELS.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether [`conv2d_activation`] runs kiln's kernel (not Burn's) on these inputs, computing it
/// once to find out: the tests that compare the two paths assert it, so that they cannot pass by
/// comparing Burn with itself.
pub fn runs_kiln_kernel(conv: &Conv2d, x: &Tensor<4>, activation: Activation) -> bool {
    #[cfg(feature = "flex")]
    return flex_kernels() && flex::forward(conv, x, activation, flex::Method::Fastest).is_some();
    #[cfg(not(feature = "flex"))]
    {
        let _ = (conv, x, activation);
        false
    }
}

/// `activation(conv(x))`: on flex (float32, one group, no dilation; under autodiff only without
/// bias and activation) by kiln's kernels, in one pass over the output; elsewhere Burn's `conv2d`
/// followed by the activation.
pub fn conv2d_activation(conv: &Conv2d, x: Tensor<4>, activation: Activation) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if flex_kernels()
        && let Some(y) = flex::forward(conv, &x, activation, flex::Method::Fastest)
    {
        return y;
    }
    let y = conv.forward(x);
    match activation {
        Activation::Identity => y,
        Activation::Silu => super::silu(y),
    }
}

/// Runs `f` on a worker of the thread pool flex and kiln's kernels share when `device` is the CPU
/// without autodiff (inference); elsewhere on this thread. From a worker, a kernel's parallel loop
/// starts at once, the other workers stealing its halves; from outside the pool each loop queues
/// a job, wakes a worker and puts the caller to sleep until it is done, which the ~100 layers of a
/// small model pay every call (measured on a 160-px yolov8n-seg, 2 cores: 6.4 -> 5.8-6.0 ms).
/// Meanwhile the other workers poll for its loops' halves ([`with_workers_awake`]). Training steps
/// take [`on_flex_workers_training`].
pub fn on_flex_workers<R: Send>(device: &burn::tensor::Device, f: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "flex")]
    // Device equality ignores autodiff.
    if *device == crate::device::cpu() && !device.is_autodiff() {
        return rayon::scope(|_| with_workers_awake(f));
    }
    #[cfg(not(feature = "flex"))]
    let _ = device;
    f()
}

/// Runs `f` on this pool worker while the pool's other workers poll for work instead of going to
/// sleep between its parallel loops (ONNX Runtime's workers spin the same way between operators).
/// A sleeping worker is woken per loop: measured on a 160-px yolov8n-seg, 2 threads, 4.56 -> 4.26
/// ms in a phase where this project's virtual machine was slow (with the idle limit below; 2.80 ->
/// 2.66 ms in a fast phase without it).
///
/// A poller gives up after [`POLL_IDLE`] without work. It has to: a worker runs a poller as any
/// other job, so one can start on top of a job that `f` waits for (stolen from `f`'s thread, which
/// then sleeps until it completes) and would otherwise keep it from completing until `f` returns,
/// which it cannot (Burn's own convolution, whose parallel loops nest, hung this way).
#[cfg(feature = "flex")]
fn with_workers_awake<R>(f: impl FnOnce() -> R) -> R {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    /// Releases the pollers when `f` returns or unwinds.
    struct Release(Arc<AtomicBool>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let done = Release(Arc::new(AtomicBool::new(false)));
    let (caller, flag) = (rayon::current_thread_index(), done.0.clone());
    rayon::spawn_broadcast(move |context| {
        // Not on the caller's own thread: it would poll on top of `f`'s frames.
        if Some(context.index()) == caller {
            return;
        }
        let mut last_work = Instant::now();
        while !flag.load(Ordering::Acquire) {
            if rayon::yield_now() == Some(rayon::Yield::Executed) {
                last_work = Instant::now();
            } else if last_work.elapsed() > POLL_IDLE {
                return;
            } else {
                std::hint::spin_loop();
            }
        }
    });
    f()
}

/// How long a poller of [`with_workers_awake`] waits for work before it leaves its worker to
/// rayon's own idling (longer than the serial stretches between a forward pass's parallel loops).
#[cfg(feature = "flex")]
const POLL_IDLE: std::time::Duration = std::time::Duration::from_micros(500);

/// [`on_flex_workers`] for a training step (`device` an autodiff CPU device too). Not what kiln's
/// trainer runs: a yolov8n-seg step at 320 px, batch 8 (~1,500 parallel loops, each of which pays
/// the wake-up from outside the pool) took 11-18 % less time this way, but under load a distilled
/// run then no longer repeated itself exactly (`cli` test
/// `a_distilled_run_killed_while_its_teacher_labels_resumes_and_ends_as_an_uninterrupted_one`,
/// with a CPU hog beside it: 4 failures in 4; not with zeroed convolution outputs either; cause
/// not found). Kept for `benches/step_breakdown.rs` (`KILN_STEP_ON=worker`) until it is.
pub fn on_flex_workers_training<R: Send>(device: &burn::tensor::Device, f: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "flex")]
    if *device == crate::device::cpu() {
        return rayon::scope(|_| f());
    }
    #[cfg(not(feature = "flex"))]
    let _ = device;
    f()
}

#[cfg(feature = "flex")]
pub(crate) use flex::{OutputPtr, matmul};

#[cfg(feature = "flex")]
mod flex {
    use super::Activation;
    use burn::backend::Autodiff;
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2d;
    use burn::tensor::{DType, Tensor, TensorData};
    use rayon::prelude::*;

    /// Which loops compute the convolution.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Method {
        /// The direct kernel ([`direct`]) where the CPU has AVX-512 and the kernel is not 1x1,
        /// im2col and gemm otherwise.
        Fastest,
        /// im2col and gemm always (what a CPU without AVX-512 runs; the tests cover both).
        #[cfg_attr(not(test), allow(dead_code))]
        Im2col,
        /// The direct kernel with this micro-tile [ROWS, VECTORS] (each of them tested).
        #[cfg(test)]
        DirectTile([usize; 2]),
    }

    /// None when the case is not one this kernel covers (the caller falls back).
    pub(super) fn forward(conv: &Conv2d, x: &Tensor<4>, activation: Activation, method: Method) -> Option<Tensor<4>> {
        let padding = match conv.padding {
            PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => [top, left],
            PaddingConfig2d::Valid => [0, 0],
            _ => return None,
        };
        if conv.groups != 1 || conv.dilation != [1, 1] {
            return None;
        }
        if let Ok(x) = x.clone().try_into_primitive::<Autodiff<Flex>>() {
            // Training: a convolution without activation (a BatchNorm follows it, or it ends a head).
            if activation != Activation::Identity {
                return None;
            }
            let weight = conv.weight.val().try_into_primitive::<Autodiff<Flex>>().ok()?;
            let bias = match &conv.bias {
                Some(bias) => Some(bias.val().try_into_primitive::<Autodiff<Flex>>().ok()?),
                None => None,
            };
            return tracked::conv2d(x, weight, bias, conv.stride, padding, method)
                .map(Tensor::from_primitive::<Autodiff<Flex>>);
        }
        let x = x.clone().try_into_primitive::<Flex>().ok()?;
        let weight = conv.weight.val().try_into_primitive::<Flex>().ok()?;
        let bias = match &conv.bias {
            Some(bias) => Some(bias.val().try_into_primitive::<Flex>().ok()?),
            None => None,
        };
        let _span = crate::nn::profile::convolution_span(crate::nn::profile::Kernel::ConvForward, || {
            ConvShape::of(&x, &weight, conv.stride, padding).describe()
        });
        let output = compute(&x, &weight, bias.as_ref(), conv.stride, padding, activation, method)?;
        Some(Tensor::from_primitive::<Flex>(output))
    }

    /// The convolution of flex tensors, or None for a case the kernels do not cover.
    fn compute(
        x: &FlexTensor,
        weight: &FlexTensor,
        bias: Option<&FlexTensor>,
        stride: [usize; 2],
        [pad_h, pad_w]: [usize; 2],
        activation: Activation,
        method: Method,
    ) -> Option<FlexTensor> {
        if x.dtype() != DType::F32 || weight.dtype() != DType::F32 || bias.is_some_and(|b| b.dtype() != DType::F32) {
            return None;
        }
        let (x, weight, bias) = (x.to_contiguous(), weight.to_contiguous(), bias.map(|b| b.to_contiguous()));
        let &[batch, channels_in, height, width] = x.layout().shape().as_slice() else { return None };
        let &[channels_out, weight_in, kernel_h, kernel_w] = weight.layout().shape().as_slice() else { return None };
        if weight_in != channels_in
            || height + 2 * pad_h < kernel_h
            || width + 2 * pad_w < kernel_w
            || stride.contains(&0)
        {
            return None;
        }
        let shape = ConvShape {
            batch,
            channels_in,
            height,
            width,
            channels_out,
            kernel: [kernel_h, kernel_w],
            stride,
            padding: [pad_h, pad_w],
        };
        let output = conv2d_f32(
            x.storage::<f32>(),
            weight.storage::<f32>(),
            bias.as_ref().map(|b| b.storage::<f32>()),
            &shape,
            activation,
            method,
        );
        let dims = [batch, channels_out, shape.out_h(), shape.out_w()];
        Some(FlexTensor::from_data(TensorData::new(output, dims)))
    }

    mod backward;

    /// Under autodiff: the forward pass through [`compute`], the backward pass kiln's
    /// ([`backward`]; Burn flex's `conv2d_x_backward` / `conv2d_weight_backward` with
    /// `KILN_CONV_BACKWARD=burn`); the input and weight saved as Burn saves them.
    mod tracked {
        use super::{ConvShape, Method, backward, compute};
        use crate::nn::profile::{self, Kernel};
        use burn::backend::autodiff::NodeId;
        use burn::backend::autodiff::checkpoint::base::Checkpointer;
        use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
        use burn::backend::autodiff::grads::Gradients;
        use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
        use burn::backend::flex::FlexTensor;
        use burn::backend::ops::ModuleOps;
        use burn::backend::tensor::FloatTensor;
        use burn::backend::{Autodiff, Flex};
        use burn::tensor::TensorData;
        use burn::tensor::ops::ConvOptions;

        #[derive(Debug)]
        struct Conv2dBackward;

        /// Burn's backward pass instead of kiln's (`KILN_CONV_BACKWARD=burn`), to compare the two.
        fn burns_backward() -> bool {
            static BURN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *BURN.get_or_init(|| std::env::var("KILN_CONV_BACKWARD").is_ok_and(|v| v == "burn"))
        }

        impl Backward<Flex, 2> for Conv2dBackward {
            type State = (FlexTensor, FlexTensor, ConvOptions<2>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_x, node_weight] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (x, weight, options) = ops.state;
                register(node_x.map(|n| n.id), node_weight.map(|n| n.id), x, weight, grad, options, grads);
            }
        }

        /// A convolution with a bias (the heads' last): its gradient is the output gradient's sum
        /// per channel.
        #[derive(Debug)]
        struct Conv2dBiasBackward;

        impl Backward<Flex, 3> for Conv2dBiasBackward {
            type State = (FlexTensor, FlexTensor, ConvOptions<2>);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let [node_x, node_weight, node_bias] = ops.parents;
                let grad = grads.consume::<Flex>(&ops.node);
                let (x, weight, options) = ops.state;
                if let Some(node) = node_bias {
                    let _span = profile::span(Kernel::ConvBiasGradient);
                    let grad = grad.to_contiguous();
                    let dims = grad.layout().shape().to_vec();
                    let (channels, plane) = (dims[1], dims[2..].iter().product());
                    let values = backward::bias_gradient(grad.storage::<f32>(), channels, plane);
                    grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(values, [channels])));
                }
                register(node_x.map(|n| n.id), node_weight.map(|n| n.id), x, weight, grad, options, grads);
            }
        }

        /// Registers the gradients of the input and the weight (those asked for).
        fn register(
            node_x: Option<NodeId>,
            node_weight: Option<NodeId>,
            x: FlexTensor,
            weight: FlexTensor,
            grad: FlexTensor,
            options: ConvOptions<2>,
            grads: &mut Gradients,
        ) {
            if burns_backward() {
                if let Some(node) = node_x {
                    let grad_x = Flex::conv2d_x_backward(x.clone(), weight.clone(), grad.clone(), options.clone());
                    grads.register::<Flex>(node, grad_x);
                }
                if let Some(node) = node_weight {
                    grads.register::<Flex>(node, Flex::conv2d_weight_backward(x, weight, grad, options));
                }
                return;
            }
            let (x, weight, grad) = (x.to_contiguous(), weight.to_contiguous(), grad.to_contiguous());
            let x_dims = x.layout().shape().to_vec();
            let weight_dims = weight.layout().shape().to_vec();
            let shape = ConvShape {
                batch: x_dims[0],
                channels_in: x_dims[1],
                height: x_dims[2],
                width: x_dims[3],
                channels_out: weight_dims[0],
                kernel: [weight_dims[2], weight_dims[3]],
                stride: options.stride,
                // Symmetric: `conv2d` below makes the options from one padding per side.
                padding: options.padding.map(|(begin, _)| begin),
            };
            if let Some(node) = node_x {
                let _span = profile::convolution_span(Kernel::ConvInputGradient, || shape.describe());
                let values = backward::input_gradient(weight.storage::<f32>(), grad.storage::<f32>(), &shape);
                grads.register::<Flex>(node, FlexTensor::from_data(TensorData::new(values, x_dims)));
            }
            if let Some(node) = node_weight {
                let _span = profile::convolution_span(Kernel::ConvWeightGradient, || shape.describe());
                let values = backward::weight_gradient(x.storage::<f32>(), grad.storage::<f32>(), &shape);
                grads.register::<Flex>(node, FlexTensor::from_data(TensorData::new(values, weight_dims)));
            }
        }

        pub(in super::super) fn conv2d(
            x: FloatTensor<Autodiff<Flex>>,
            weight: FloatTensor<Autodiff<Flex>>,
            bias: Option<FloatTensor<Autodiff<Flex>>>,
            stride: [usize; 2],
            padding: [usize; 2],
            method: Method,
        ) -> Option<FloatTensor<Autodiff<Flex>>> {
            let _span = profile::convolution_span(Kernel::ConvForward, || {
                ConvShape::of(x.primitive(), weight.primitive(), stride, padding).describe()
            });
            let output = compute(
                x.primitive(),
                weight.primitive(),
                bias.as_ref().map(|b| b.primitive()),
                stride,
                padding,
                super::Activation::Identity,
                method,
            )?;
            let options = ConvOptions::new(stride, padding, [1, 1], 1);
            let Some(bias) = bias else {
                let nodes = [x.node(), weight.node()];
                return Some(match Conv2dBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
                    OpsKind::Tracked(prep) => {
                        prep.finish((x.into_primitive(), weight.into_primitive(), options), output)
                    }
                    OpsKind::UnTracked(prep) => prep.finish(output),
                });
            };
            let nodes = [x.node(), weight.node(), bias.node()];
            Some(match Conv2dBiasBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish((x.into_primitive(), weight.into_primitive(), options), output),
                OpsKind::UnTracked(prep) => prep.finish(output),
            })
        }
    }

    pub(super) struct ConvShape {
        pub batch: usize,
        pub channels_in: usize,
        pub height: usize,
        pub width: usize,
        pub channels_out: usize,
        pub kernel: [usize; 2],
        pub stride: [usize; 2],
        pub padding: [usize; 2],
    }

    impl ConvShape {
        /// The shape of a call on `x` [batch, c_in, h, w] with `weight` [c_out, c_in, kh, kw]
        /// (4-d both: the callers' layers guarantee it).
        fn of(x: &FlexTensor, weight: &FlexTensor, stride: [usize; 2], padding: [usize; 2]) -> Self {
            let (x, w) = (x.layout().shape(), weight.layout().shape());
            Self {
                batch: x[0],
                channels_in: x[1],
                height: x[2],
                width: x[3],
                channels_out: w[0],
                kernel: [w[2], w[3]],
                stride,
                padding,
            }
        }

        fn out_h(&self) -> usize {
            (self.height + 2 * self.padding[0] - self.kernel[0]) / self.stride[0] + 1
        }
        fn out_w(&self) -> usize {
            (self.width + 2 * self.padding[1] - self.kernel[1]) / self.stride[1] + 1
        }
        /// For the profile: a name and the multiply-adds of one call.
        pub(super) fn describe(&self) -> (String, u64) {
            let name = format!(
                "{}x{}->{} {}x{} s{} {}x{}",
                self.batch,
                self.channels_in,
                self.channels_out,
                self.kernel[0],
                self.kernel[1],
                self.stride[0],
                self.height,
                self.width
            );
            let taps = self.kernel[0] * self.kernel[1];
            let macs = self.batch * self.channels_out * self.channels_in * taps * self.out_h() * self.out_w();
            (name, macs as u64)
        }

        fn is_pointwise(&self) -> bool {
            self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
        }

        /// Where the direct kernel and the weight gradient read a padded copy of one image.
        fn padded_layout(&self) -> PaddedLayout {
            let [kernel_h, kernel_w] = self.kernel;
            let [pad_h, pad_w] = self.padding;
            let [stride_h, stride_w] = self.stride;
            let (padded_h, padded_w) = (self.height + 2 * pad_h, self.width + 2 * pad_w);
            // A strided convolution reads each padded plane as stride_h x stride_w phases (the
            // rows y = stride_h * i + a, columns x = stride_w * j + b): tap (ky, kx) is then a
            // unit-stride tap on one phase, and one kernel serves every stride.
            // At stride 1 a row's right padding can be the next row's left (the taps reach
            // pad_w columns past either end): rows of width + pad_w values, not width + 2 pad_w,
            // fewer positions computed and dropped (3x3 on a 5-wide map: 6 per row, not 7).
            let shared_padding = self.stride == [1, 1] && pad_w < kernel_w;
            let (phase_h, phase_w) = if shared_padding {
                (padded_h, self.width + pad_w)
            } else {
                (padded_h.div_ceil(stride_h), padded_w.div_ceil(stride_w))
            };
            // The last row's right padding: zeros after the plane.
            let tail = if shared_padding { pad_w } else { 0 };
            let phase_plane = phase_h * phase_w + tail;
            let offsets: Vec<usize> = (0..kernel_h)
                .flat_map(|ky| {
                    (0..kernel_w).map(move |kx| {
                        let phase = (ky % stride_h) * stride_w + kx % stride_w;
                        phase * phase_plane + ky / stride_h * phase_w + kx / stride_w
                    })
                })
                .collect();
            PaddedLayout {
                phase_h,
                phase_w,
                tail,
                channel_len: stride_h * stride_w * phase_plane,
                reach: offsets.iter().copied().max().unwrap_or(0),
                offsets,
                // Output positions on the phase width: out_w valid ones, then columns dropped.
                span: self.out_h() * phase_w,
            }
        }
    }

    /// A padded image: each channel's plane as stride_h x stride_w phases of [phase_h, phase_w]
    /// values, each followed by `tail` zeros (`channel_len` values a channel); output position
    /// q = oy * phase_w + ox (`span` of them, those with ox >= out_w dropped) reads tap t at
    /// q + offsets[t] of its channel, at most `reach` past q.
    pub(super) struct PaddedLayout {
        pub phase_h: usize,
        pub phase_w: usize,
        pub tail: usize,
        pub channel_len: usize,
        pub offsets: Vec<usize>,
        pub span: usize,
        pub reach: usize,
    }

    /// A raw pointer shared by tasks: into the output, of which each writes a disjoint block, or
    /// into an im2col matrix they only read (also `nn::max_pool`'s).
    #[derive(Clone, Copy)]
    pub(crate) struct OutputPtr(pub(crate) *mut f32);
    unsafe impl Send for OutputPtr {}
    unsafe impl Sync for OutputPtr {}

    impl OutputPtr {
        // A method, not the field: a closure would capture the bare pointer field, which is not Sync.
        pub(crate) fn at(&self, offset: usize) -> *mut f32 {
            self.0.wrapping_add(offset)
        }
    }

    /// dst = scale * lhs rhs, on this thread, by the `gemm` crate; each operand as (pointer, row
    /// stride, column stride): dst [m, n] (overwritten, not read), lhs [m, k], rhs [k, n]. The one
    /// form of gemm's call that kiln's kernels use.
    ///
    /// # Safety
    /// Every element the strides reach lies within its operand's allocation; dst overlaps neither.
    pub(crate) unsafe fn matmul(
        [m, n, k]: [usize; 3],
        dst: (*mut f32, usize, usize),
        lhs: (*const f32, usize, usize),
        rhs: (*const f32, usize, usize),
        scale: f32,
    ) {
        let stride = |s: usize| s as isize;
        // SAFETY: as the caller guarantees.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.0,
                stride(dst.2),
                stride(dst.1),
                false,
                lhs.0,
                stride(lhs.2),
                stride(lhs.1),
                rhs.0,
                stride(rhs.2),
                stride(rhs.1),
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    }

    /// Output columns per block: a block's im2col matrix (`k` rows) stays near 1 MiB, the size of
    /// one core's L2 on current x86 parts, and no block is narrower than gemm's packing makes worth it.
    fn block_columns(k: usize, positions: usize, tasks_wanted: usize) -> usize {
        let by_cache = ((1 << 18) / k.max(1)).clamp(64, 1024) / 16 * 16;
        let by_balance = positions.div_ceil(tasks_wanted).div_ceil(16) * 16;
        by_cache.min(by_balance.max(64))
    }

    /// Below this many multiply-adds a convolution runs on the calling thread: waking the pool
    /// costs more than it saves (the small layers of a 160-px model).
    const SERIAL_WORK: usize = 1 << 20;

    pub(super) fn conv2d_f32(
        x: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        shape: &ConvShape,
        activation: Activation,
        method: Method,
    ) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if !shape.is_pointwise() && direct::available() {
            match method {
                Method::Fastest => return direct::conv2d_f32(x, weight, bias, shape, activation, None),
                #[cfg(test)]
                Method::DirectTile(tile) => return direct::conv2d_f32(x, weight, bias, shape, activation, Some(tile)),
                Method::Im2col => {}
            }
        }
        let (out_h, out_w) = (shape.out_h(), shape.out_w());
        let positions = out_h * out_w;
        let [kernel_h, kernel_w] = shape.kernel;
        let k = shape.channels_in * kernel_h * kernel_w;
        let (m, batch) = (shape.channels_out, shape.batch);
        let len = batch * m * positions;
        if len == 0 {
            return Vec::new();
        }
        // Not zeroed: the blocks below write every value (gemm overwrites its destination).
        let mut output = Vec::<f32>::with_capacity(len);
        let serial = batch * m * k * positions < SERIAL_WORK;
        let threads = if serial { 1 } else { rayon::current_num_threads().max(1) };
        let columns = block_columns(k, positions, 2 * threads);
        let column_blocks = positions.div_ceil(columns);
        let pointwise = shape.is_pointwise();
        let out = OutputPtr(output.as_mut_ptr());
        let input_plane = shape.channels_in * shape.height * shape.width;
        // One block of the output: rows m0..m0+rows, columns p0..p0+cols of `image`, from `rhs`,
        // the block's [k, cols] im2col matrix (or the input itself) with the row stride given.
        let block = |image: usize, m0: usize, rows: usize, p0: usize, cols: usize, rhs: *const f32, rhs_rs: usize| {
            // SAFETY: `dst` spans rows m0..m0+rows, columns p0..p0+cols of this image's output, a
            // block no other task writes; `lhs` is rows m0.. of the [m, k] weight and `rhs` a
            // [k, cols] matrix with the row stride given, both alive for the call.
            unsafe {
                let dst = out.at(image * m * positions + m0 * positions + p0);
                matmul(
                    [rows, cols, k],
                    (dst, positions, 1),
                    (weight.as_ptr().add(m0 * k), k, 1),
                    (rhs, rhs_rs, 1),
                    1.0,
                );
                for row in 0..rows {
                    let values = std::slice::from_raw_parts_mut(dst.add(row * positions), cols);
                    finish(values, bias.map_or(0.0, |b| b[m0 + row]), activation);
                }
            }
        };

        if serial || batch * column_blocks >= 2 * threads {
            // Enough column blocks for every core: each task builds its block's im2col and
            // computes all output channels of it.
            let task = |col: &mut Vec<f32>, task: usize| {
                let (image, p0) = (task / column_blocks, task % column_blocks * columns);
                let cols = columns.min(positions - p0);
                let xb = &x[image * input_plane..(image + 1) * input_plane];
                if pointwise {
                    block(image, 0, m, p0, cols, xb[p0..].as_ptr(), positions);
                } else {
                    col.resize(k * cols, 0.0);
                    im2col(xb, shape, out_w, p0, cols, col);
                    block(image, 0, m, p0, cols, col.as_ptr(), cols);
                }
            };
            if serial {
                let mut col = Vec::new();
                (0..batch * column_blocks).for_each(|t| task(&mut col, t));
            } else {
                (0..batch * column_blocks).into_par_iter().for_each_init(Vec::new, task);
            }
        } else {
            // Few output positions (the deep, small layers): one im2col per image, and the output
            // channels split among the cores.
            let rows_per_chunk = m.div_ceil(2 * threads).div_ceil(16) * 16;
            let mut col = Vec::new();
            for image in 0..batch {
                let xb = &x[image * input_plane..(image + 1) * input_plane];
                let rhs = if pointwise {
                    xb.as_ptr()
                } else {
                    col.resize(k * positions, 0.0);
                    im2col(xb, shape, out_w, 0, positions, &mut col);
                    col.as_ptr()
                };
                let rhs = OutputPtr(rhs.cast_mut());
                (0..m.div_ceil(rows_per_chunk)).into_par_iter().for_each(|chunk| {
                    let m0 = chunk * rows_per_chunk;
                    block(image, m0, rows_per_chunk.min(m - m0), 0, positions, rhs.at(0), positions);
                });
            }
        }
        // SAFETY: every one of the `len` values was written above (each task's block, the
        // blocks tiling all images, channels and positions).
        unsafe { output.set_len(len) };
        output
    }

    /// Convolutions without an im2col matrix (every one but 1x1 on an AVX-512 CPU): each image is
    /// padded once, and on a padded plane an output position q = oy * row + ox reads tap (ky, kx)
    /// at q + ky * row + kx, so a run of consecutive positions reads a run of consecutive inputs,
    /// whatever the row length (a strided convolution reads its plane as stride x stride phases,
    /// where every tap is unit-stride). The micro-kernel keeps ROWS output channels x COLS
    /// positions in registers and reads the weights in Burn's own [c_out, c_in, kh, kw] order (no
    /// packing per call); positions on the padding columns are computed and dropped (one per row
    /// for a 3x3 at stride 1, where rows share their padding).
    #[cfg(target_arch = "x86_64")]
    pub(super) mod direct {
        use super::{Activation, ConvShape, OutputPtr, PaddedLayout, SERIAL_WORK, finish, pad_phases};
        use rayon::prelude::*;
        use std::arch::x86_64::*;

        // A micro-tile is ROWS output channels x VECTORS 16-float vectors of positions: ROWS x
        // VECTORS accumulators (at most 24 of the 32 registers); per input channel and tap VECTORS
        // loads and ROWS broadcasts feed ROWS x VECTORS multiply-adds.

        pub(in super::super) fn available() -> bool {
            std::arch::is_x86_feature_detected!("avx512f")
        }

        pub(in super::super) fn conv2d_f32(
            x: &[f32],
            weight: &[f32],
            bias: Option<&[f32]>,
            shape: &ConvShape,
            activation: Activation,
            tile: Option<[usize; 2]>,
        ) -> Vec<f32> {
            debug_assert!(available());
            match tile.unwrap_or_else(|| tile_for(shape)) {
                [8, 3] => run::<8, 3>(x, weight, bias, shape, activation),
                [12, 2] => run::<12, 2>(x, weight, bias, shape, activation),
                [16, 1] => run::<16, 1>(x, weight, bias, shape, activation),
                _ => run::<24, 1>(x, weight, bias, shape, activation),
            }
        }

        /// The micro-tile [ROWS, VECTORS] that computes the fewest values that are dropped, for
        /// the speed of each: the rows past c_out in the last block of output channels, the
        /// positions past the span in the last tile (a 5x5 map's 30 positions fill 30 of one
        /// 48-position tile, 30 of 32). Measured: a 160-px yolov8n-seg inference on one thread
        /// 2.2 % faster than with 8 x 3 everywhere.
        fn tile_for(shape: &ConvShape) -> [usize; 2] {
            let span = shape.padded_layout().span;
            // Each tile's speed per computed value relative to 8 x 3's (measured on a 64 -> 64 3x3
            // 20x20 layer, where all waste about as little: 174, 157, 144 and 107 G multiply-adds/s
            // over 97, 94, 97 and 86 % of the values kept).
            let cost = |[rows, vectors]: [usize; 2], speed: usize| {
                shape.channels_out.div_ceil(rows) * rows * span.div_ceil(16 * vectors) * 16 * vectors * 100 / speed
            };
            [([8, 3], 100), ([12, 2], 93), ([16, 1], 83), ([24, 1], 69)]
                .into_iter()
                .min_by_key(|&(tile, speed)| cost(tile, speed))
                .expect("four tiles")
                .0
        }

        fn run<const ROWS: usize, const VECTORS: usize>(
            x: &[f32],
            weight: &[f32],
            bias: Option<&[f32]>,
            shape: &ConvShape,
            activation: Activation,
        ) -> Vec<f32> {
            let cols = 16 * VECTORS;
            let [kernel_h, kernel_w] = shape.kernel;
            let (height, width) = (shape.height, shape.width);
            let (out_h, out_w) = (shape.out_h(), shape.out_w());
            let (channels, m, batch) = (shape.channels_in, shape.channels_out, shape.batch);
            let k = channels * kernel_h * kernel_w;
            let PaddedLayout { phase_h, phase_w, tail, channel_len, offsets, span, reach } = shape.padded_layout();
            let image_len = channels * channel_len;
            let tiles = span.div_ceil(cols);
            // One image at a time (the padded copy is one image's, not the batch's); the last
            // tile of the last channel reads up to cols + reach past it.
            let padded_len = image_len + cols + reach;
            let positions = out_h * out_w;
            // Input channels per pass: 32 for a 3x3 (measured: 16 and all channels are slower
            // on a 64-channel 160x160 map).
            let channel_pass = (288 / (kernel_h * kernel_w)).max(1);
            // Not zeroed: the tasks write every valid position of every channel.
            let mut output = Vec::<f32>::with_capacity(batch * m * positions);
            let threads = rayon::current_num_threads().max(1);
            let serial = batch * m * k * positions < SERIAL_WORK;
            // A batch of several images (training) goes image by image to the cores, each image
            // on one thread: one parallel loop a convolution instead of two an image (measured on
            // a yolov8n-seg training step, batch 8, 320 px, 2 cores: the direct kernel forward 71.8 -> 65.0
            // ms a step, as input gradient 74.3 -> 68.9 ms).
            let by_image = !serial && batch > 1 && (batch % threads == 0 || batch >= 4 * threads);
            let blocks = m.div_ceil(ROWS);
            let out = OutputPtr(output.as_mut_ptr());
            let input_len = channels * height * width;
            // One image, its loops parallel or not.
            let one_image = |image: usize, kept: &mut Vec<f32>, parallel: bool| {
                if kept.len() < padded_len {
                    *kept = vec![0f32; padded_len];
                }
                let padded = &mut kept[..padded_len];
                pad_phases(
                    &x[image * input_len..(image + 1) * input_len],
                    padded,
                    shape,
                    [phase_h, phase_w, tail],
                    parallel,
                );
                let padded = &*padded;
                // Tiles per task: four tasks per core, and a chunk's input window (all channels)
                // at most 512 KiB: the tasks go chunk by chunk, every block of output channels of
                // a chunk in turn, so the window is read from memory once and from L2 by the other
                // blocks (block by block, a 128-channel 160x160 map was read 16 times: 2.5x slower).
                let chunks_wanted = (4 * if parallel { threads } else { 1 }).div_ceil(blocks);
                let window_tiles = ((1 << 17) / (channels * cols)).max(1);
                let chunk_tiles = tiles.div_ceil(chunks_wanted).clamp(1, 32).min(window_tiles);
                let chunks = tiles.div_ceil(chunk_tiles);
                let task = |buffer: &mut Vec<f32>, task: usize| {
                    let (chunk, block) = (task / blocks, task % blocks);
                    let first_tile = chunk * chunk_tiles;
                    let len = chunk_tiles.min(tiles - first_tile) * cols;
                    buffer.resize(ROWS * len, 0.0);
                    let rows = ROWS.min(m - block * ROWS);
                    // Rows past c_out repeat the last one: computed, never written out.
                    let weight_rows: [*const f32; ROWS] =
                        std::array::from_fn(|r| weight[(block * ROWS + r.min(rows - 1)) * k..].as_ptr());
                    let input = padded.as_ptr();
                    // A few input channels at a time over all the task's tiles: their rows stay in
                    // L1 from one tile to the next (all channels of a large map would not).
                    for c0 in (0..channels).step_by(channel_pass) {
                        let pass = channel_pass.min(channels - c0);
                        let weights = weight_rows.map(|row| row.wrapping_add(c0 * offsets.len()));
                        for tile in 0..len / cols {
                            let q = first_tile * cols + tile * cols;
                            // SAFETY: the CPU has AVX-512F (`available`, checked by the caller); every
                            // weight row holds k = channels x offsets.len() values; the input reads
                            // end within `padded` (cols + reach of slack after the image); the
                            // tile's ROWS x cols block lies within `buffer` (rows `len` apart).
                            unsafe {
                                micro_kernel::<ROWS, VECTORS>(
                                    &weights,
                                    input.add(c0 * channel_len + q),
                                    channel_len,
                                    &offsets,
                                    pass,
                                    buffer.as_mut_ptr().add(tile * cols),
                                    len,
                                    c0 > 0,
                                )
                            };
                        }
                    }
                    // Bias and activation over the whole block while it is in cache (the dropped
                    // columns too: one long vectorised run beats a short one per output row), then
                    // the valid positions to the output.
                    let (q0, q1) = (first_tile * cols, (first_tile * cols + len).min(span));
                    for row in 0..rows {
                        let channel = block * ROWS + row;
                        let source = &mut buffer[row * len..row * len + q1 - q0];
                        finish(source, bias.map_or(0.0, |b| b[channel]), activation);
                        let source = &*source;
                        let mut q = q0;
                        while q < q1 {
                            let (oy, ox) = (q / phase_w, q % phase_w);
                            let end = (q - ox + out_w).min(q1);
                            if ox < out_w {
                                // SAFETY: positions oy * out_w + ox.. of this image and channel's
                                // plane; this task alone writes this channel block and span.
                                let dst = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        out.at((image * m + channel) * positions + oy * out_w + ox),
                                        end - q,
                                    )
                                };
                                dst.copy_from_slice(&source[q - q0..end - q0]);
                            }
                            q += phase_w - ox;
                        }
                    }
                };
                let tasks = blocks * chunks;
                if parallel {
                    (0..tasks).into_par_iter().for_each_init(Vec::new, task);
                } else {
                    let mut buffer = Vec::new();
                    (0..tasks).for_each(|t| task(&mut buffer, t));
                }
            };
            if by_image {
                (0..batch).into_par_iter().for_each(|image| {
                    let mut kept = take_padded();
                    one_image(image, &mut kept, false);
                    keep_padded(kept);
                });
            } else {
                let mut kept = take_padded();
                let parallel = m * k * positions >= SERIAL_WORK;
                for image in 0..batch {
                    one_image(image, &mut kept, parallel);
                }
                keep_padded(kept);
            }
            // SAFETY: every image's tasks wrote each channel's out_h x out_w positions.
            unsafe { output.set_len(batch * m * positions) };
            output
        }

        thread_local! {
            /// The padded input, kept for the next call on this thread: a fresh buffer the size
            /// of a large map costs a page fault per 4 KiB each call (measured: +1.6 ms on the
            /// 64-channel 160x160 convolution of a 640-px segmentation model, 6.7 MB).
            static PADDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }

        /// This thread's kept padded buffer (empty if none, or if it is in use).
        fn take_padded() -> Vec<f32> {
            PADDED.with(|cell| cell.try_borrow_mut().map(|mut slot| std::mem::take(&mut *slot)).unwrap_or_default())
        }

        /// Keeps `buffer` for this thread's next call, unless it is larger than
        /// [`KEPT_PADDED_MAX`] or smaller than the one kept.
        fn keep_padded(buffer: Vec<f32>) {
            if buffer.len() <= KEPT_PADDED_MAX {
                PADDED.with(|cell| {
                    if let Ok(mut slot) = cell.try_borrow_mut()
                        && slot.len() < buffer.len()
                    {
                        *slot = buffer;
                    }
                });
            }
        }

        /// The largest padded input kept between calls (16 MiB: a 128-channel 160x160 map's,
        /// yolov8s-seg's largest at 640, is 13.4 MB); larger ones are freed.
        const KEPT_PADDED_MAX: usize = 4 << 20;

        /// dst[r][j] (+)= sum over channels c and taps t of weight_rows[r][c * taps + t]
        /// * input[c * plane + offsets[t] + j], for r < ROWS, j < COLS.
        #[target_feature(enable = "avx512f")]
        unsafe fn micro_kernel<const ROWS: usize, const VECTORS: usize>(
            weight_rows: &[*const f32; ROWS],
            input: *const f32,
            plane: usize,
            offsets: &[usize],
            channels: usize,
            dst: *mut f32,
            dst_stride: usize,
            accumulate: bool,
        ) {
            let mut acc = [[_mm512_setzero_ps(); VECTORS]; ROWS];
            if accumulate {
                for r in 0..ROWS {
                    for v in 0..VECTORS {
                        // SAFETY: within the caller's ROWS x COLS block of `dst`.
                        acc[r][v] = unsafe { _mm512_loadu_ps(dst.add(r * dst_stride + 16 * v)) };
                    }
                }
            }
            let mut kk = 0;
            for c in 0..channels {
                // SAFETY (this block and the next): within the bounds the caller guarantees.
                let base = unsafe { input.add(c * plane) };
                for &offset in offsets {
                    let x: [__m512; VECTORS] =
                        std::array::from_fn(|v| unsafe { _mm512_loadu_ps(base.add(offset + 16 * v)) });
                    for r in 0..ROWS {
                        let w = _mm512_set1_ps(unsafe { *weight_rows[r].add(kk) });
                        for v in 0..VECTORS {
                            acc[r][v] = _mm512_fmadd_ps(w, x[v], acc[r][v]);
                        }
                    }
                    kk += 1;
                }
            }
            for r in 0..ROWS {
                for v in 0..VECTORS {
                    // SAFETY: within the caller's ROWS x COLS block of `dst`.
                    unsafe { _mm512_storeu_ps(dst.add(r * dst_stride + 16 * v), acc[r][v]) };
                }
            }
        }
    }

    /// Each [height, width] plane of `x`, padded, as its [phase_h, phase_w] phases (stride 1:
    /// the one padded plane, rows sharing their padding columns), each followed by `tail`
    /// zeros; every value written, since the buffer holds the last call's; what follows the
    /// last plane (the slack the last tile reads) zeroed.
    pub(super) fn pad_phases(
        x: &[f32],
        padded: &mut [f32],
        shape: &ConvShape,
        [phase_h, phase_w, tail]: [usize; 3],
        parallel: bool,
    ) {
        let (height, width) = (shape.height, shape.width);
        let [pad_h, pad_w] = shape.padding;
        let [stride_h, stride_w] = shape.stride;
        let channel_len = stride_h * stride_w * (phase_h * phase_w + tail);
        let planes = x.len() / (height * width);
        let (body, slack) = padded.split_at_mut(planes * channel_len);
        slack.fill(0.0);
        let one_plane = |(source, dst): (&[f32], &mut [f32])| {
            for (phase, phase_plane) in dst.chunks_exact_mut(phase_h * phase_w + tail).enumerate() {
                let (phase_plane, tail) = phase_plane.split_at_mut(phase_h * phase_w);
                tail.fill(0.0);
                let (a, b) = (phase / stride_w, phase % stride_w);
                // Phase columns j whose padded column stride_w * j + b is an input column.
                let first = pad_w.saturating_sub(b).div_ceil(stride_w);
                let end = (pad_w + width).saturating_sub(b).div_ceil(stride_w).min(phase_w);
                for (i, line) in phase_plane.chunks_exact_mut(phase_w).enumerate() {
                    let y = stride_h * i + a;
                    if y < pad_h || y >= pad_h + height || first >= end {
                        line.fill(0.0);
                        continue;
                    }
                    let row = &source[(y - pad_h) * width..(y - pad_h + 1) * width];
                    line[..first].fill(0.0);
                    line[end..].fill(0.0);
                    let x0 = stride_w * first + b - pad_w;
                    if stride_w == 1 {
                        line[first..end].copy_from_slice(&row[x0..x0 + end - first]);
                    } else {
                        // Chunks, not an index times the stride: this form vectorises.
                        for (value, chunk) in line[first..end].iter_mut().zip(row[x0..].chunks(stride_w)) {
                            *value = chunk[0];
                        }
                    }
                }
            }
        };
        let (sources, targets) = (x.chunks_exact(height * width), body.chunks_exact_mut(channel_len));
        if parallel {
            let (sources, targets) = (x.par_chunks_exact(height * width), body.par_chunks_exact_mut(channel_len));
            sources.zip(targets).for_each(one_plane);
        } else {
            sources.zip(targets).for_each(one_plane);
        }
    }

    /// Columns p0..p0+cols of the [k, positions] im2col matrix of one image, row by row
    /// (channel, kernel row, kernel column), zeros where the window reaches into the padding.
    fn im2col(x: &[f32], shape: &ConvShape, out_w: usize, p0: usize, cols: usize, col: &mut [f32]) {
        let (height, width) = (shape.height as isize, shape.width);
        let [kernel_h, kernel_w] = shape.kernel;
        let [stride_h, stride_w] = shape.stride;
        let [pad_h, pad_w] = shape.padding;
        let mut row = 0;
        for channel in 0..shape.channels_in {
            let plane = &x[channel * shape.height * width..(channel + 1) * shape.height * width];
            for ky in 0..kernel_h {
                for kx in 0..kernel_w {
                    let dst_row = &mut col[row * cols..(row + 1) * cols];
                    row += 1;
                    // Output columns whose input column ox * stride + kx - pad lies inside the image.
                    let first_valid = (pad_w.saturating_sub(kx)).div_ceil(stride_w);
                    let end_valid = if width + pad_w > kx { (width + pad_w - kx - 1) / stride_w + 1 } else { 0 };
                    let (mut j, mut p) = (0, p0);
                    while j < cols {
                        let (oy, ox0) = (p / out_w, p % out_w);
                        let run = (out_w - ox0).min(cols - j);
                        let dst = &mut dst_row[j..j + run];
                        let iy = (oy * stride_h + ky) as isize - pad_h as isize;
                        if iy < 0 || iy >= height {
                            dst.fill(0.0);
                        } else {
                            let src = &plane[iy as usize * width..(iy as usize + 1) * width];
                            let lo = first_valid.clamp(ox0, ox0 + run);
                            let hi = end_valid.clamp(lo, ox0 + run);
                            dst[..lo - ox0].fill(0.0);
                            dst[hi - ox0..].fill(0.0);
                            if lo < hi {
                                let ix0 = lo * stride_w + kx - pad_w;
                                let valid = &mut dst[lo - ox0..hi - ox0];
                                if stride_w == 1 {
                                    valid.copy_from_slice(&src[ix0..ix0 + valid.len()]);
                                } else {
                                    for (i, v) in valid.iter_mut().enumerate() {
                                        *v = src[ix0 + i * stride_w];
                                    }
                                }
                            }
                        }
                        j += run;
                        p += run;
                    }
                }
            }
        }
    }

    /// `values + bias`, then the activation, in place; the widest vector unit the CPU has.
    fn finish(values: &mut [f32], bias: f32, activation: Activation) {
        match activation {
            Activation::Identity => values.iter_mut().for_each(|v| *v += bias),
            Activation::Silu => super::silu_in_place(values, bias),
        }
    }
}

/// Calls `$name` from `simd::avx512` or `simd::avx2` when the CPU has that instruction set
/// (detected at run time), from `portable` otherwise.
macro_rules! widest_simd {
    ($name:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked above).
                return unsafe { simd::avx512::$name($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                return unsafe { simd::avx2::$name($($arg),*) };
            }
        }
        portable::$name($($arg),*)
    }};
}

/// `v = silu(v + bias)` over a slice, vectorised (AVX-512 or AVX2 where the CPU has them).
pub(crate) fn silu_in_place(values: &mut [f32], bias: f32) {
    widest_simd!(silu_in_place(values, bias))
}

/// `dst = silu(src)`, vectorised as [`silu_in_place`].
pub(crate) fn silu_to(src: &[f32], dst: &mut [f32]) {
    widest_simd!(silu_to(src, dst))
}

/// `dst = grad * silu'(x)` with silu'(x) = s(x)·(1 + x·(1 − s(x))), vectorised as [`silu_in_place`].
pub(crate) fn silu_gradient(x: &[f32], grad: &[f32], dst: &mut [f32]) {
    widest_simd!(silu_gradient(x, grad, dst))
}

/// The loops, written once; `simd` compiles them again for AVX-512 and AVX2.
mod portable {
    use super::exp_f32;

    #[inline(always)]
    pub fn silu_in_place(values: &mut [f32], bias: f32) {
        for v in values.iter_mut() {
            let x = *v + bias;
            *v = x / (1.0 + exp_f32(-x));
        }
    }

    #[inline(always)]
    pub fn silu_to(src: &[f32], dst: &mut [f32]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = x / (1.0 + exp_f32(-x));
        }
    }

    #[inline(always)]
    pub fn silu_gradient(x: &[f32], grad: &[f32], dst: &mut [f32]) {
        for ((d, &x), &g) in dst.iter_mut().zip(x).zip(grad) {
            let s = 1.0 / (1.0 + exp_f32(-x));
            *d = g * s * (1.0 + x * (1.0 - s));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    macro_rules! variant {
        ($name:ident, $features:literal) => {
            pub mod $name {
                use super::super::portable;

                #[target_feature(enable = $features)]
                pub unsafe fn silu_in_place(values: &mut [f32], bias: f32) {
                    portable::silu_in_place(values, bias)
                }

                #[target_feature(enable = $features)]
                pub unsafe fn silu_to(src: &[f32], dst: &mut [f32]) {
                    portable::silu_to(src, dst)
                }

                #[target_feature(enable = $features)]
                pub unsafe fn silu_gradient(x: &[f32], grad: &[f32], dst: &mut [f32]) {
                    portable::silu_gradient(x, grad, dst)
                }
            }
        };
    }
    variant!(avx2, "avx2,fma");

    /// The forward passes by hand for AVX-512: the reciprocal 1 / (1 + e^-x) as `vrcp14ps` and a
    /// Newton step (within 2 ulp) instead of a division, which LLVM's vectorised loop issues at one
    /// per several cycles (measured: SiLU was 7.8 % of a 160-px yolov8n-seg inference on one
    /// thread); the tail through a masked load and store, so every value takes the same path.
    pub mod avx512 {
        use super::super::portable;
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx512f")]
        pub unsafe fn silu_in_place(values: &mut [f32], bias: f32) {
            let bias = _mm512_set1_ps(bias);
            let ptr = values.as_mut_ptr();
            let mut i = 0;
            while i < values.len() {
                let mask = lanes(values.len() - i);
                // SAFETY: the lanes of `mask` lie within `values`.
                unsafe {
                    let x = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, ptr.add(i)), bias);
                    _mm512_mask_storeu_ps(ptr.add(i), mask, silu(x));
                }
                i += 16;
            }
        }

        #[target_feature(enable = "avx512f")]
        pub unsafe fn silu_to(src: &[f32], dst: &mut [f32]) {
            let len = src.len().min(dst.len());
            let mut i = 0;
            while i < len {
                let mask = lanes(len - i);
                // SAFETY: the lanes of `mask` lie within both slices.
                unsafe {
                    let x = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(i));
                    _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i), mask, silu(x));
                }
                i += 16;
            }
        }

        #[target_feature(enable = "avx512f")]
        pub unsafe fn silu_gradient(x: &[f32], grad: &[f32], dst: &mut [f32]) {
            portable::silu_gradient(x, grad, dst)
        }

        /// The first min(remaining, 16) lanes.
        #[inline(always)]
        fn lanes(remaining: usize) -> __mmask16 {
            if remaining >= 16 { 0xffff } else { ((1u32 << remaining) - 1) as __mmask16 }
        }

        /// x / (1 + e^-x), e^-x as [`super::super::exp_f32`] computes it.
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn silu(x: __m512) -> __m512 {
            let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), x));
            let d = _mm512_add_ps(e, _mm512_set1_ps(1.0));
            let r = _mm512_rcp14_ps(d);
            // r (2 - d r): the Newton step for 1 / d.
            let r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)));
            _mm512_mul_ps(x, r)
        }

        /// Cephes' `expf`, as [`super::super::exp_f32`], 16 lanes.
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn exp(x: __m512) -> __m512 {
            const ROUND: f32 = 12_582_912.0;
            let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0)), _mm512_set1_ps(88.0));
            let shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), _mm512_set1_ps(ROUND));
            let n = _mm512_sub_ps(shifted, _mm512_set1_ps(ROUND));
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm512_set1_ps(1.987_569_2e-4);
            for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            let e_r = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
            let exponent = _mm512_add_epi32(
                _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_set1_epi32(ROUND.to_bits() as i32)),
                _mm512_set1_epi32(127),
            );
            _mm512_mul_ps(e_r, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(exponent)))
        }
    }
}

/// e^x without branches, so loops over it vectorise: Cephes' `expf` (range reduction by ln 2 in
/// two parts, a degree-5 polynomial; within 2 ulp of libm), the argument clamped to where the
/// result is a normal float (SiLU reads e^x only through 1 / (1 + e^x), which saturates there).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let exponent = (shifted.to_bits() as i32 - ROUND.to_bits() as i32 + 127) as u32;
    e_r * f32::from_bits(exponent << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::activation::silu;
    use burn::tensor::{Device, Distribution, TensorData};

    fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// Largest |a - b| / (|b| + floor) over two equally long lists.
    fn worst_error(a: &[f32], b: &[f32], floor: f32) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs() / (y.abs() + floor)).fold(0.0, f32::max)
    }

    /// Burn's convolution (parallel loops nested in parallel loops) in many calls, each with its
    /// pollers, gives the same values every time and finishes. (What it guards against, a poller on
    /// top of a stolen half that the call waits for, hung `kiln bench` with `KILN_FLEX_KERNELS=0`
    /// in one run of six before pollers gave up when idle; this test's calls did not hit that
    /// interleaving in 3 x 3,000 calls of the old code: a smoke test, not a reproduction.)
    #[test]
    fn nested_parallel_loops_under_polling_workers_finish() {
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let device = Device::flex();
            let conv =
                Conv2dConfig::new([16, 16], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(&device);
            let x = Tensor::<4>::random([1, 16, 40, 40], Distribution::Normal(0.0, 1.0), &device);
            let layers = || on_flex_workers(&device, || conv.forward(conv.forward(conv.forward(x.clone()))));
            let first = floats(layers());
            for _ in 0..3000 {
                assert_eq!(floats(layers()), first);
            }
            sender.send(()).expect("the test waits");
        });
        receiver.recv_timeout(std::time::Duration::from_secs(120)).expect("the calls finish (a hang otherwise)");
    }

    #[test]
    fn exp_matches_libm_over_the_clamped_range() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let rel = (exp_f32(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(-1000.0), (-87f32).exp());
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn silu_matches_burn_including_extremes() {
        let device = Device::flex();
        let mut values: Vec<f32> = (-3000..3000).map(|i| i as f32 * 0.01).collect();
        values.extend([-1e6, -100.0, -88.5, 88.5, 100.0, 1e6, 0.0, -0.0]);
        let n = values.len();
        let expected = floats(silu(Tensor::<1>::from_data(TensorData::new(values.clone(), [n]), &device)));
        let mut got = values.clone();
        silu_in_place(&mut got, 0.0);
        let worst = worst_error(&got, &expected, 1e-6);
        assert!(worst < 1e-6, "worst relative error {worst}");
        let mut copied = vec![0f32; n];
        silu_to(&values, &mut copied);
        assert_eq!(copied, got);
        // The gradient against the formula in float64, on values where it is not cancelled out.
        let grads: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        let mut gradient = vec![0f32; n];
        silu_gradient(&values, &grads, &mut gradient);
        for ((&x, &g), &d) in values.iter().zip(&grads).zip(&gradient) {
            let (x64, g64) = (x as f64, g as f64);
            let s = 1.0 / (1.0 + (-x64).exp());
            let expected = g64 * s * (1.0 + x64 * (1.0 - s));
            assert!((d as f64 - expected).abs() <= 1e-6 * (1.0 + expected.abs()), "x {x}: {d} vs {expected}");
        }
        let mut shifted = vec![0.25f32; 37];
        silu_in_place(&mut shifted, 0.5);
        assert!(shifted.iter().all(|&v| (v - 0.75 / (1.0 + (-0.75f32).exp())).abs() < 1e-6));
    }

    /// The fused path against Burn's conv2d + bias + SiLU on the same flex tensors: kernel sizes,
    /// strides, paddings, channel counts and image sizes that hit every branch (pointwise, im2col,
    /// windows in the padding, several images; small enough to run serially, column blocks over
    /// the cores, output channels split across them).
    #[test]
    fn fused_convolution_matches_burn() {
        let device = Device::flex();
        let cases: &[(usize, usize, usize, usize, usize, usize, usize, usize, bool)] = &[
            // (batch, c_in, c_out, h, w, kernel, stride, padding, bias)
            (1, 3, 16, 33, 40, 3, 2, 1, true),
            (2, 16, 24, 17, 19, 3, 1, 1, true),
            (1, 32, 64, 8, 8, 1, 1, 0, true),
            (2, 8, 200, 5, 7, 3, 1, 1, false),
            (1, 64, 40, 3, 3, 3, 2, 1, true),
            (1, 4, 8, 64, 64, 1, 1, 0, false),
            (1, 5, 6, 9, 11, 5, 2, 2, true),
            (1, 7, 3, 6, 6, 2, 2, 0, true),
            (3, 12, 20, 40, 24, 3, 1, 1, true),
            // Above SERIAL_WORK: column blocks over the cores (im2col, pointwise) ...
            (2, 64, 48, 32, 32, 1, 1, 0, true),
            // ... and few positions, the output channels split (im2col, pointwise).
            (1, 128, 100, 6, 6, 3, 1, 1, true),
            (1, 1024, 90, 4, 5, 1, 1, 0, false),
            // The direct kernel: input channels in several passes, output channels not a
            // multiple of its 8 rows, a map smaller than one tile, odd sizes at stride 2, tasks
            // over the cores at stride 1 and 2, a tall kernel reaching far into the padding.
            (1, 70, 13, 11, 9, 3, 1, 1, true),
            (1, 5, 3, 2, 3, 3, 1, 1, true),
            (2, 9, 17, 15, 13, 3, 2, 1, true),
            (1, 64, 64, 40, 40, 3, 1, 1, true),
            (2, 3, 16, 66, 50, 3, 2, 1, false),
            (1, 6, 10, 12, 7, 7, 1, 3, true),
            // No padding at stride 1: rows of the bare width, the taps reaching into the next row
            // only for positions that are dropped.
            (2, 6, 9, 7, 8, 3, 1, 0, true),
        ];
        for &(batch, c_in, c_out, h, w, kernel, stride, padding, bias) in cases {
            let conv = Conv2dConfig::new([c_in, c_out], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(padding, padding, padding, padding))
                .with_bias(bias)
                .init(&device);
            let x = Tensor::<4>::random([batch, c_in, h, w], Distribution::Normal(0.0, 2.0), &device);
            for activation in [Activation::Silu, Activation::Identity] {
                let expected = match activation {
                    Activation::Silu => silu(conv.forward(x.clone())),
                    Activation::Identity => conv.forward(x.clone()),
                };
                let dims = expected.dims();
                // Sums in another order: a value near zero is compared on the output's scale.
                let expected = floats(expected);
                let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
                // The kernels themselves, not the fallback (which would compare Burn with Burn):
                // the one this CPU runs (the direct kernel where it has AVX-512) and im2col.
                let tiles = [[8, 3], [12, 2], [16, 1], [24, 1]].map(flex::Method::DirectTile);
                for method in [flex::Method::Fastest, flex::Method::Im2col].into_iter().chain(tiles) {
                    let got = flex::forward(&conv, &x, activation, method).expect("the flex kernel takes this case");
                    assert_eq!(got.dims(), dims);
                    let worst = worst_error(&floats(got), &expected, 1e-2 * scale);
                    assert!(
                        worst < 1e-4,
                        "{batch}x{c_in}->{c_out} {h}x{w} k{kernel} s{stride} p{padding} {activation:?} {method:?}: {worst}"
                    );
                }
            }
        }
    }
}
