//! kiln's flex kernels under autodiff (training): a convolution without activation (every
//! Ultralytics `Conv` in training, a BatchNorm following it, and a head's last convolution, with
//! its bias) runs kiln's kernel forward and kiln's backward pass; SiLU in the output loop is for
//! inference only, so an autodiff input asking for it takes Burn's conv2d and kiln's SiLU; kiln's
//! SiLU and BatchNorm have backward passes of their own. Each is checked here against Burn's own.

#![cfg(feature = "flex")]

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::tensor::{Device, Distribution, Tensor};
use kiln_models::device::read_floats;
use kiln_models::nn::{Activation, conv2d_activation, runs_kiln_kernel, silu};

/// Largest |a - b| over the largest |b|.
fn relative_to_scale(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max) / scale
}

#[test]
fn autodiff_inputs_with_an_activation_take_burns_convolution() {
    let device = Device::flex().autodiff();
    let conv = Conv2dConfig::new([3, 4], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(&device);
    let x = Tensor::<4>::random([2, 3, 6, 6], Distribution::Default, &device).require_grad();
    assert!(!runs_kiln_kernel(&conv, &x, Activation::Silu), "SiLU in the output loop under autodiff takes Burn's path");

    let fused = conv2d_activation(&conv, x.clone(), Activation::Silu);
    let fused_grads = fused.clone().sum().backward();
    let reference = silu(conv.forward(x.clone()));
    let reference_grads = reference.clone().sum().backward();

    assert_eq!(read_floats(fused).unwrap(), read_floats(reference).unwrap());
    let weight_grad = |grads| read_floats(conv.weight.grad(grads).expect("the weight has a gradient")).unwrap();
    assert_eq!(weight_grad(&fused_grads), weight_grad(&reference_grads));
    let input_grad = |grads| read_floats(x.grad(grads).expect("the input has a gradient")).unwrap();
    assert_eq!(input_grad(&fused_grads), input_grad(&reference_grads));
}

/// Training's convolution (no activation; with a bias where it ends a head) on kiln's kernels
/// against Burn's conv2d: values and the gradients of the input, the weight and the bias within
/// 1e-5 of their scale (sums in another order).
#[test]
fn training_convolutions_match_burns_values_and_gradients() {
    let device = Device::flex().autodiff();
    // (batch, c_in, c_out, side, kernel, stride, padding, bias): 3x3s, strided ones (their input
    // gradient by columns added back), pointwise ones (one image: the weight gradient splits its
    // output channels among the cores), input channels in several passes of the kernel, 5x5s,
    // 3x3s without padding, channel counts not a multiple of 8, odd sides, a head's 1x1 with bias;
    // the weight gradient of 3x3s over 16 or more input channels by kiln's own kernel (output
    // channels not a multiple of its tile, input channels not a multiple of 16), the others
    // (fewer channels, 1x1, 5x5) by gemm.
    for (batch, c_in, c_out, side, kernel, stride, padding, bias) in [
        (2, 3, 16, 20, 3, 2, 1, false),
        (2, 16, 24, 17, 3, 1, 1, false),
        (1, 40, 8, 9, 1, 1, 0, false),
        (1, 24, 40, 12, 1, 1, 0, true),
        (3, 20, 12, 11, 1, 1, 0, true),
        (1, 70, 12, 10, 3, 1, 1, false),
        (3, 5, 7, 13, 5, 1, 2, false),
        (2, 6, 9, 9, 3, 1, 0, true),
        (2, 8, 16, 15, 3, 2, 1, false),
        (4, 33, 17, 7, 3, 1, 1, false),
        (2, 6, 5, 11, 1, 2, 0, false),
        (3, 7, 6, 14, 5, 2, 2, true),
        (1, 4, 8, 12, 3, 2, 0, false),
        (2, 5, 6, 10, 3, 3, 1, false),
        (2, 16, 8, 13, 3, 2, 1, false),
        (1, 32, 20, 9, 3, 2, 0, true),
        (3, 48, 13, 6, 3, 1, 1, false),
    ] {
        let conv = Conv2dConfig::new([c_in, c_out], [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(padding, padding, padding, padding))
            .with_bias(bias)
            .init(&device);
        let x = Tensor::<4>::random([batch, c_in, side, side], Distribution::Normal(0.0, 2.0), &device).require_grad();
        assert!(runs_kiln_kernel(&conv, &x, Activation::Identity), "kiln's kernel takes training's convolution");
        let ours = conv2d_activation(&conv, x.clone(), Activation::Identity);
        let burns = conv.forward(x.clone());
        let upstream = Tensor::<4>::random(burns.dims(), Distribution::Uniform(-1.0, 1.0), &device);
        let ours_grads = (ours.clone() * upstream.clone()).sum().backward();
        let burns_grads = (burns.clone() * upstream).sum().backward();

        let case = format!("{batch}x{c_in}->{c_out} {side}px k{kernel} s{stride} p{padding} bias {bias}");
        let close = |what: &str, a: Vec<f32>, b: Vec<f32>| {
            let error = relative_to_scale(&a, &b);
            assert!(error < 1e-5, "{case}: {what} differ by {error} of their scale");
        };
        close("values", read_floats(ours).unwrap(), read_floats(burns).unwrap());
        let weight_grad = |grads| read_floats(conv.weight.grad(grads).expect("the weight has a gradient")).unwrap();
        close("weight gradients", weight_grad(&ours_grads), weight_grad(&burns_grads));
        let input_grad = |grads| read_floats(x.grad(grads).expect("the input has a gradient")).unwrap();
        close("input gradients", input_grad(&ours_grads), input_grad(&burns_grads));
        if let Some(bias) = &conv.bias {
            let bias_grad = |grads| read_floats(bias.grad(grads).expect("the bias has a gradient")).unwrap();
            close("bias gradients", bias_grad(&ours_grads), bias_grad(&burns_grads));
        }
    }
}

/// kiln's SiLU against Burn's `x * sigmoid(x)`: values and the input's gradient under autodiff, on
/// a tensor small enough for one thread and one split among the cores, with an upstream gradient
/// that is not all ones (so the backward pass's product with it is checked).
#[test]
fn silu_values_and_gradients_match_burns() {
    let device = Device::flex().autodiff();
    for shape in [[1, 3, 5, 7], [2, 16, 64, 40]] {
        let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 4.0), &device).require_grad();
        let weights = Tensor::<4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
        assert!(kiln_models::nn::silu::flex::silu(&x).is_some(), "kiln's kernel takes a flex autodiff tensor");

        let ours = silu(x.clone());
        let ours_grads = (ours.clone() * weights.clone()).sum().backward();
        let burns = burn::tensor::activation::silu(x.clone());
        let burns_grads = (burns.clone() * weights).sum().backward();

        let values = relative_to_scale(&read_floats(ours).unwrap(), &read_floats(burns).unwrap());
        assert!(values < 1e-6, "{shape:?}: values differ by {values} of their scale");
        let gradient = |grads| read_floats(x.grad(grads).expect("the input has a gradient")).unwrap();
        let gradients = relative_to_scale(&gradient(&ours_grads), &gradient(&burns_grads));
        assert!(gradients < 1e-5, "{shape:?}: gradients differ by {gradients} of their scale");
    }
    // Without autodiff, the one-pass forward.
    let plain = Tensor::<2>::random([300, 200], Distribution::Normal(0.0, 4.0), &Device::flex());
    let ours = read_floats(silu(plain.clone())).unwrap();
    let burns = read_floats(burn::tensor::activation::silu(plain)).unwrap();
    assert!(relative_to_scale(&ours, &burns) < 1e-6);
}

/// kiln's training BatchNorm, alone and followed by SiLU, against burn-nn's (and Burn's SiLU):
/// the output, the running statistics it leaves, and the gradients of the input, gamma and beta,
/// within 1e-5 of their scale (sums in another order, kiln's in float64); a plane of one value, a
/// batch of one, a mean far from zero.
#[test]
fn batch_norm_values_statistics_and_gradients_match_burn_nn() {
    use burn::module::Param;
    use burn::nn::BatchNormConfig;
    use kiln_models::nn::{batch_norm, batch_norm_silu};

    let device = Device::flex().autodiff();
    let cases = [
        ([2, 5, 7, 9], 0.0),
        ([8, 16, 40, 40], 3.0),
        ([1, 3, 1, 1], 0.0),
        ([3, 24, 1, 1], -2.0),
        ([2, 4, 30, 50], 50.0),
    ];
    for ((shape, mean), with_silu) in cases.into_iter().flat_map(|case| [(case, false), (case, true)]) {
        let channels = shape[1];
        let gamma = Tensor::<1>::random([channels], Distribution::Uniform(0.5, 1.5), &device);
        let beta = Tensor::<1>::random([channels], Distribution::Uniform(-0.5, 0.5), &device);
        let running = Tensor::<1>::random([channels], Distribution::Uniform(0.5, 1.5), &device);
        let make = || {
            let mut bn = BatchNormConfig::new(channels).with_epsilon(1e-3).with_momentum(0.03).init(&device);
            bn.gamma = Param::from_tensor(gamma.clone());
            bn.beta = Param::from_tensor(beta.clone());
            bn.running_var.update(running.clone());
            bn
        };
        let (ours_bn, burns_bn) = (make(), make());
        let x = Tensor::<4>::random(shape, Distribution::Normal(mean, 2.0), &device).require_grad();
        let upstream = Tensor::<4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
        assert!(
            kiln_models::nn::batch_norm::flex::train(&x, &gamma, &beta, 1e-3, with_silu).is_some(),
            "kiln's kernel takes a flex autodiff tensor"
        );

        let (ours, burns) = if with_silu {
            (batch_norm_silu(&ours_bn, x.clone()), burn::tensor::activation::silu(burns_bn.forward(x.clone())))
        } else {
            (batch_norm(&ours_bn, x.clone()), burns_bn.forward(x.clone()))
        };
        let ours_grads = (ours.clone() * upstream.clone()).sum().backward();
        let burns_grads = (burns.clone() * upstream).sum().backward();

        let case = format!("{shape:?} mean {mean} silu {with_silu}");
        let within = |what: &str, a: Vec<f32>, b: Vec<f32>, bound: f32| {
            let error = relative_to_scale(&a, &b);
            assert!(error < bound, "{case}: {what} differs by {error} of its scale");
        };
        let close = |what: &str, a: Vec<f32>, b: Vec<f32>| within(what, a, b, 1e-5);
        close("the output", read_floats(ours).unwrap(), read_floats(burns).unwrap());
        let statistic = |t: Tensor<1>| read_floats(t).unwrap();
        let moved = statistic(ours_bn.running_mean.value_sync());
        assert!(moved.iter().any(|&m| m != 0.0), "{case}: the running mean moved from its zeros");
        close(
            "the running mean",
            statistic(ours_bn.running_mean.value_sync()),
            statistic(burns_bn.running_mean.value_sync()),
        );
        close(
            "the running variance",
            statistic(ours_bn.running_var.value_sync()),
            statistic(burns_bn.running_var.value_sync()),
        );
        let x_grad = |grads| read_floats(x.grad(grads).expect("the input has a gradient")).unwrap();
        // Through SiLU the input gradient carries kiln's SiLU derivative (its exp within 3e-7 of
        // libm's) into g - mean(g) - x_hat mean(g x_hat), which cancels most of it when a channel
        // has a few values (three here): 1e-4 then, measured up to 1.2e-5.
        let bound = if with_silu { 1e-4 } else { 1e-5 };
        within("the input gradient", x_grad(&ours_grads), x_grad(&burns_grads), bound);
        let param_grad = |bn: &burn::nn::BatchNorm, grads, gamma: bool| {
            let param = if gamma { &bn.gamma } else { &bn.beta };
            read_floats(param.grad(grads).expect("the parameter has a gradient")).unwrap()
        };
        close("gamma's gradient", param_grad(&ours_bn, &ours_grads, true), param_grad(&burns_bn, &burns_grads, true));
        close("beta's gradient", param_grad(&ours_bn, &ours_grads, false), param_grad(&burns_bn, &burns_grads, false));
    }
}

/// kiln's GELU against Burn's (libm's erf): values and the input's gradient under autodiff within
/// 1e-6 of their scale, on a tensor small enough for one thread and one split among the cores,
/// over a range that covers both tails; without autodiff, the one-pass forward.
#[test]
fn gelu_values_and_gradients_match_burns() {
    use kiln_models::nn::gelu;

    let device = Device::flex().autodiff();
    for shape in [[1, 3, 5, 7], [2, 16, 64, 40]] {
        let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 4.0), &device).require_grad();
        let weights = Tensor::<4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
        assert!(kiln_models::nn::gelu::flex::gelu(&x).is_some(), "kiln's kernel takes a flex autodiff tensor");

        let ours = gelu(x.clone());
        let ours_grads = (ours.clone() * weights.clone()).sum().backward();
        let burns = burn::tensor::activation::gelu(x.clone());
        let burns_grads = (burns.clone() * weights).sum().backward();

        let values = relative_to_scale(&read_floats(ours).unwrap(), &read_floats(burns).unwrap());
        assert!(values < 1e-6, "{shape:?}: values differ by {values} of their scale");
        let gradient = |grads| read_floats(x.grad(grads).expect("the input has a gradient")).unwrap();
        let gradients = relative_to_scale(&gradient(&ours_grads), &gradient(&burns_grads));
        assert!(gradients < 1e-6, "{shape:?}: gradients differ by {gradients} of their scale");
    }
    let plain = Tensor::<2>::random([300, 200], Distribution::Normal(0.0, 4.0), &Device::flex());
    let ours = read_floats(gelu(plain.clone())).unwrap();
    let burns = read_floats(burn::tensor::activation::gelu(plain)).unwrap();
    assert!(relative_to_scale(&ours, &burns) < 1e-6);
}

#[test]
fn strided_transposed_convolution_values_and_gradients_match_burns() {
    use burn::module::Param;
    use burn::nn::conv::ConvTranspose2dConfig;
    use kiln_models::nn::conv_transpose::{conv_transpose2d, flex};

    // (batch, c_in, c_out, height, width, kernel = stride, bias)
    let cases = [
        (2, 5, 7, 6, 9, [2, 2], true),
        (8, 16, 16, 10, 10, [2, 2], true),
        (1, 3, 4, 5, 3, [3, 2], false),
        (3, 8, 2, 1, 1, [2, 2], true),
    ];
    for (batch, c_in, c_out, height, width, kernel, bias) in cases {
        let case = format!("{batch}x{c_in}->{c_out} {height}x{width} kernel {kernel:?} bias {bias}");
        for device in [Device::flex().autodiff(), Device::flex()] {
            let mut layer =
                ConvTranspose2dConfig::new([c_in, c_out], kernel).with_stride(kernel).with_bias(bias).init(&device);
            // Non-zero bias, so that its place in the output is checked too.
            if bias {
                layer.bias =
                    Some(Param::from_tensor(Tensor::random([c_out], Distribution::Uniform(-1.0, 1.0), &device)));
            }
            let x = Tensor::<4>::random([batch, c_in, height, width], Distribution::Normal(0.0, 1.0), &device);
            let x = if device.is_autodiff() { x.require_grad() } else { x };
            assert!(flex::forward(&layer, &x).is_some(), "{case}: kiln's kernel applies");
            let (ours, burns) = (conv_transpose2d(&layer, x.clone()), layer.forward(x.clone()));
            assert_eq!(ours.dims(), burns.dims(), "{case}");
            let error = relative_to_scale(&read_floats(ours.clone()).unwrap(), &read_floats(burns.clone()).unwrap());
            assert!(error < 1e-5, "{case}: the output differs by {error} of its scale");
            if !device.is_autodiff() {
                continue;
            }
            let upstream = Tensor::<4>::random(burns.dims(), Distribution::Uniform(-1.0, 1.0), &device);
            let ours_grads = (ours * upstream.clone()).sum().backward();
            let burns_grads = (burns * upstream).sum().backward();
            let within = |what: &str, a: Vec<f32>, b: Vec<f32>| {
                let error = relative_to_scale(&a, &b);
                assert!(error < 1e-5, "{case}: {what} differs by {error} of its scale");
            };
            let x_grad = |grads| read_floats(x.grad(grads).expect("the input has a gradient")).unwrap();
            within("the input gradient", x_grad(&ours_grads), x_grad(&burns_grads));
            let w_grad = |grads| read_floats(layer.weight.grad(grads).expect("the weight has a gradient")).unwrap();
            within("the weight gradient", w_grad(&ours_grads), w_grad(&burns_grads));
            if let Some(b) = &layer.bias {
                let b_grad = |grads| read_floats(b.grad(grads).expect("the bias has a gradient")).unwrap();
                within("the bias gradient", b_grad(&ours_grads), b_grad(&burns_grads));
            }
        }
    }
}

#[test]
fn binary_cross_entropy_values_and_gradients_match_the_composed_form() {
    use kiln_models::nn::bce;

    for device in [Device::flex().autodiff(), Device::flex()] {
        for shape in [[3, 5], [37, 1000]] {
            let logits = Tensor::<2>::random(shape, Distribution::Normal(0.0, 8.0), &device);
            let targets = Tensor::<2>::random(shape, Distribution::Uniform(0.0, 1.0), &device);
            let (logits, targets) =
                if device.is_autodiff() { (logits.require_grad(), targets.require_grad()) } else { (logits, targets) };
            assert!(bce::flex::forward(&logits, &targets).is_some(), "kiln's kernel applies");
            let ours = bce::bce_with_logits(logits.clone(), targets.clone());
            let composed = bce::composed(logits.clone(), targets.clone());
            let case = format!("{shape:?} autodiff {}", device.is_autodiff());
            let error = relative_to_scale(&read_floats(ours.clone()).unwrap(), &read_floats(composed.clone()).unwrap());
            assert!(error < 1e-6, "{case}: the loss differs by {error} of its scale");
            if !device.is_autodiff() {
                continue;
            }
            let upstream = Tensor::<2>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
            let ours_grads = (ours * upstream.clone()).sum().backward();
            let composed_grads = (composed * upstream).sum().backward();
            for (what, tensor) in [("logits", &logits), ("targets", &targets)] {
                let grad = |grads| read_floats(tensor.grad(grads).expect("a gradient")).unwrap();
                let error = relative_to_scale(&grad(&ours_grads), &grad(&composed_grads));
                assert!(error < 1e-5, "{case}: the gradient of the {what} differs by {error} of its scale");
            }
        }
    }
}
