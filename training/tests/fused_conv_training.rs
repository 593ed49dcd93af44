//! kiln's flex kernels under autodiff (training): a convolution with neither bias nor activation
//! (every Ultralytics `Conv` in training: a BatchNorm follows it) runs kiln's kernel forward and
//! kiln's backward pass (the weight gradient always, the input gradient at stride 1; Burn's
//! transposed convolution for a strided one's input gradient); one with a bias or SiLU in its output loop is for inference only, so an
//! autodiff input takes Burn's conv2d and kiln's SiLU; kiln's SiLU has a backward pass of its own.
//! Each is checked here against Burn's own.

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
fn autodiff_inputs_with_a_bias_take_burns_convolution() {
    let device = Device::flex().autodiff();
    let conv = Conv2dConfig::new([3, 4], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(&device);
    let x = Tensor::<4>::random([2, 3, 6, 6], Distribution::Default, &device).require_grad();
    assert!(!runs_kiln_kernel(&conv, &x, Activation::Silu), "a bias and SiLU under autodiff take Burn's path");

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

/// Training's convolution (no bias, no activation) on kiln's kernels against Burn's conv2d:
/// values and the gradients of the input and the weight within 1e-5 of their scale (sums in
/// another order).
#[test]
fn training_convolutions_match_burns_values_and_gradients() {
    let device = Device::flex().autodiff();
    // (batch, c_in, c_out, side, kernel, stride, padding): a 3x3, strided ones (their input
    // gradient is Burn's), pointwise ones (one image: the weight gradient splits its output
    // channels among the cores), input channels in several passes of the kernel, a 5x5, a 3x3
    // without padding, channel counts not a multiple of 8, odd sides.
    for (batch, c_in, c_out, side, kernel, stride, padding) in [
        (2, 3, 16, 20, 3, 2, 1),
        (2, 16, 24, 17, 3, 1, 1),
        (1, 40, 8, 9, 1, 1, 0),
        (1, 24, 40, 12, 1, 1, 0),
        (3, 20, 12, 11, 1, 1, 0),
        (1, 70, 12, 10, 3, 1, 1),
        (3, 5, 7, 13, 5, 1, 2),
        (2, 6, 9, 9, 3, 1, 0),
        (2, 8, 16, 15, 3, 2, 1),
        (4, 33, 17, 7, 3, 1, 1),
    ] {
        let conv = Conv2dConfig::new([c_in, c_out], [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(padding, padding, padding, padding))
            .with_bias(false)
            .init(&device);
        let x = Tensor::<4>::random([batch, c_in, side, side], Distribution::Normal(0.0, 2.0), &device).require_grad();
        assert!(runs_kiln_kernel(&conv, &x, Activation::Identity), "kiln's kernel takes training's convolution");
        let ours = conv2d_activation(&conv, x.clone(), Activation::Identity);
        let burns = conv.forward(x.clone());
        let upstream = Tensor::<4>::random(burns.dims(), Distribution::Uniform(-1.0, 1.0), &device);
        let ours_grads = (ours.clone() * upstream.clone()).sum().backward();
        let burns_grads = (burns.clone() * upstream).sum().backward();

        let case = format!("{batch}x{c_in}->{c_out} {side}px k{kernel} s{stride}");
        let values = relative_to_scale(&read_floats(ours).unwrap(), &read_floats(burns).unwrap());
        assert!(values < 1e-5, "{case}: values differ by {values} of their scale");
        let weight_grad = |grads| read_floats(conv.weight.grad(grads).expect("the weight has a gradient")).unwrap();
        let weights = relative_to_scale(&weight_grad(&ours_grads), &weight_grad(&burns_grads));
        assert!(weights < 1e-5, "{case}: weight gradients differ by {weights} of their scale");
        let input_grad = |grads| read_floats(x.grad(grads).expect("the input has a gradient")).unwrap();
        let inputs = relative_to_scale(&input_grad(&ours_grads), &input_grad(&burns_grads));
        assert!(inputs < 1e-5, "{case}: input gradients differ by {inputs} of their scale");
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
