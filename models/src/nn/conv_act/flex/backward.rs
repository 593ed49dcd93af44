//! The backward pass of training's convolution on flex (no bias, no activation: a BatchNorm
//! follows every Ultralytics `Conv`), without the copies Burn's generic one makes.
//!
//! Why: Burn computes the weight gradient as a convolution of the batch-transposed input with the
//! batch-transposed output gradient as its kernel (an im2col matrix as large as the input times
//! the taps, NCHW<->NHWC copies, and a gemm whose output is one row of nine values wide), and the
//! input gradient as a transposed convolution (gemm into columns, then a scatter per element).
//! Profiled on the yolov8n-seg training step (batch 8, 320 px), those two were about 45 % of it.
//!
//! Here the weight gradient reads the padded copy the forward kernel reads ([`PaddedLayout`]): for
//! tap t, dW[:, :, t] = G · X_t, G the output gradient laid on the padded grid ([c_out, span],
//! dropped positions zero) and X_t the [span, c_in] view of the padded input shifted by the tap's
//! offset (column c is channel c's plane, contiguous): one gemm per image and tap, no im2col. At
//! stride 1 the input gradient is the convolution of the output gradient with the weights
//! flipped and transposed, padded k - 1 - p: the forward kernel itself; at other strides it is
//! W^T G per image (one gemm) added back where each tap read (col2im).

use super::super::Activation;
use super::{ConvShape, Method, OutputPtr, PaddedLayout, conv2d_f32, pad_phases};
use rayon::prelude::*;

/// dL/dx of a convolution ([batch, c_in, height, width]) from dL/dy (`grad`, [batch, c_out,
/// out_h, out_w]).
pub(in super::super) fn input_gradient(weight: &[f32], grad: &[f32], shape: &ConvShape) -> Vec<f32> {
    let [kernel_h, kernel_w] = shape.kernel;
    let [pad_h, pad_w] = shape.padding;
    if shape.stride != [1, 1] || pad_h >= kernel_h || pad_w >= kernel_w {
        return scattered_input_gradient(weight, grad, shape);
    }
    let (c_out, c_in) = (shape.channels_out, shape.channels_in);
    // flipped[i][o][ky][kx] = weight[o][i][kh - 1 - ky][kw - 1 - kx]
    let mut flipped = vec![0f32; weight.len()];
    for o in 0..c_out {
        for i in 0..c_in {
            for ky in 0..kernel_h {
                for kx in 0..kernel_w {
                    flipped[((i * c_out + o) * kernel_h + kernel_h - 1 - ky) * kernel_w + kernel_w - 1 - kx] =
                        weight[((o * c_in + i) * kernel_h + ky) * kernel_w + kx];
                }
            }
        }
    }
    let transposed = ConvShape {
        batch: shape.batch,
        channels_in: c_out,
        height: shape.out_h(),
        width: shape.out_w(),
        channels_out: c_in,
        kernel: shape.kernel,
        stride: [1, 1],
        padding: [kernel_h - 1 - pad_h, kernel_w - 1 - pad_w],
    };
    debug_assert_eq!((transposed.out_h(), transposed.out_w()), (shape.height, shape.width));
    conv2d_f32(grad, &flipped, None, &transposed, Activation::Identity, Method::Fastest)
}

/// The input gradient of a strided convolution: per image, the columns W^T G ([c_in x taps,
/// positions], one gemm) added back where each tap read them (col2im). Images in parallel, each
/// whole on one thread: every value is summed in one order.
fn scattered_input_gradient(weight: &[f32], grad: &[f32], shape: &ConvShape) -> Vec<f32> {
    let (c_in, c_out) = (shape.channels_in, shape.channels_out);
    let (height, width) = (shape.height, shape.width);
    let (out_h, out_w) = (shape.out_h(), shape.out_w());
    let [kernel_h, kernel_w] = shape.kernel;
    let [stride_h, stride_w] = shape.stride;
    let [pad_h, pad_w] = shape.padding;
    let (positions, rows) = (out_h * out_w, c_in * kernel_h * kernel_w);
    let input_len = c_in * height * width;
    let mut dx = vec![0f32; shape.batch * input_len];
    if dx.is_empty() || positions == 0 || c_out == 0 {
        return dx;
    }
    dx.par_chunks_mut(input_len).enumerate().for_each_init(Vec::new, |columns: &mut Vec<f32>, (image, dx)| {
        columns.resize(rows * positions, 0.0);
        // SAFETY: dst is the [rows, positions] `columns`; lhs(i, o) = weight[o * rows + i] (the
        // [c_out, rows] weight transposed), rhs(o, j) = grad[image][o][j], all within bounds.
        unsafe {
            gemm::gemm(
                rows,
                positions,
                c_out,
                columns.as_mut_ptr(),
                1,
                positions as isize,
                false,
                weight.as_ptr(),
                rows as isize,
                1,
                grad[image * c_out * positions..].as_ptr(),
                1,
                positions as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
        for (c, plane) in dx.chunks_exact_mut(height * width).enumerate() {
            for ky in 0..kernel_h {
                for kx in 0..kernel_w {
                    let row = &columns[((c * kernel_h + ky) * kernel_w + kx) * positions..][..positions];
                    // Output columns whose input column ox * stride_w + kx - pad_w is in the image.
                    let first = pad_w.saturating_sub(kx).div_ceil(stride_w);
                    let end = if width + pad_w > kx { ((width + pad_w - kx - 1) / stride_w + 1).min(out_w) } else { 0 };
                    for oy in 0..out_h {
                        let iy = oy * stride_h + ky;
                        if iy < pad_h || iy - pad_h >= height || first >= end {
                            continue;
                        }
                        let line = &mut plane[(iy - pad_h) * width..][..width];
                        let source = &row[oy * out_w..][..out_w];
                        for ox in first..end {
                            line[ox * stride_w + kx - pad_w] += source[ox];
                        }
                    }
                }
            }
        }
    });
    dx
}

/// dL/db of a convolution: dL/dy ([batch, channels, plane]) summed per channel, each channel
/// on one thread, in float64 over float32 blocks.
pub(in super::super) fn bias_gradient(grad: &[f32], channels: usize, plane: usize) -> Vec<f32> {
    if plane == 0 {
        return vec![0.0; channels];
    }
    (0..channels)
        .into_par_iter()
        .map(|c| {
            let planes = grad.chunks_exact(plane).skip(c).step_by(channels);
            planes.map(crate::nn::batch_norm::flex::sum).sum::<f64>() as f32
        })
        .collect()
}

/// dL/dW ([c_out, c_in, kh, kw]) of a convolution, from its input `x` and dL/dy (`grad`). Each
/// image's share is computed apart and the shares are added in image order, so the result does
/// not depend on how the thread pool splits the work (training must repeat itself exactly).
pub(in super::super) fn weight_gradient(x: &[f32], grad: &[f32], shape: &ConvShape) -> Vec<f32> {
    let (batch, c_in, c_out) = (shape.batch, shape.channels_in, shape.channels_out);
    let (out_h, out_w) = (shape.out_h(), shape.out_w());
    let [kernel_h, kernel_w] = shape.kernel;
    let taps = kernel_h * kernel_w;
    let weight_len = c_out * c_in * taps;
    let (input_len, grad_len) = (c_in * shape.height * shape.width, c_out * out_h * out_w);
    if weight_len == 0 || batch == 0 || grad_len == 0 {
        return vec![0.0; weight_len];
    }
    let threads = rayon::current_num_threads().max(1);
    let PaddedLayout { phase_h, phase_w, tail, channel_len, offsets, span, reach } = shape.padded_layout();
    // A 1x1 convolution reads the input and the gradient as they are.
    let pointwise = shape.is_pointwise();
    let (padded_len, grid_len) = if pointwise {
        (0, 0)
    } else {
        // The last channel's last tap reads span values from reach past its start.
        ((c_in * channel_len).max((c_in - 1) * channel_len + reach + span), c_out * span)
    };
    let mut padded = vec![0f32; batch * padded_len];
    let mut grid = vec![0f32; batch * grid_len];
    if !pointwise {
        padded.par_chunks_mut(padded_len).zip(grid.par_chunks_mut(grid_len)).enumerate().for_each(
            |(image, (padded, grid))| {
                pad_phases(
                    &x[image * input_len..(image + 1) * input_len],
                    padded,
                    shape,
                    [phase_h, phase_w, tail],
                    false,
                );
                let grad = &grad[image * grad_len..(image + 1) * grad_len];
                for (rows, source) in grid.chunks_exact_mut(span).zip(grad.chunks_exact(out_h * out_w)) {
                    for (row, source) in rows.chunks_exact_mut(phase_w).zip(source.chunks_exact(out_w)) {
                        row[..out_w].copy_from_slice(source);
                    }
                }
            },
        );
    }
    // (lhs, its row stride, rhs at tap 0, its column stride, k) of one image.
    let operands = |image: usize| {
        if pointwise {
            let positions = out_h * out_w;
            (grad[image * grad_len..].as_ptr(), positions, x[image * input_len..].as_ptr(), positions, positions)
        } else {
            (grid[image * grid_len..].as_ptr(), span, padded[image * padded_len..].as_ptr(), channel_len, span)
        }
    };
    let mut shares = vec![0f32; batch * weight_len];
    let out = OutputPtr(shares.as_mut_ptr());
    // Too few (image, tap) pairs for the cores (one image of a 1x1 convolution): each also
    // splits its output channels, in blocks of at least 16.
    let row_blocks = (2 * threads).div_ceil(batch * taps).min(c_out.div_ceil(16)).max(1);
    let block_rows = c_out.div_ceil(row_blocks);
    let tasks = batch * taps * row_blocks;
    (0..tasks).into_par_iter().for_each(|task| {
        let (image, tap, block) = (task / (taps * row_blocks), task / row_blocks % taps, task % row_blocks);
        let (first_row, rows) = (block * block_rows, block_rows.min(c_out - block * block_rows));
        let (lhs, lhs_rs, rhs, rhs_cs, k) = operands(image);
        // SAFETY: dst(o, i) = shares[image][first_row + o][i][tap] (row stride c_in * taps,
        // column stride taps): this task alone writes those entries of this image's share; lhs(o, q) =
        // lhs[(first_row + o) * lhs_rs + q] lies in the image's gradient (grid), rhs(q, i) = rhs[offsets[tap] +
        // i * rhs_cs + q] in its padded input (q < k = span; `padded_len` covers the last
        // channel's reach), or for a 1x1 in the image's input.
        unsafe {
            gemm::gemm(
                rows,
                c_in,
                k,
                out.at(image * weight_len + first_row * c_in * taps + tap),
                taps as isize,
                (c_in * taps) as isize,
                false,
                lhs.add(first_row * lhs_rs),
                1,
                lhs_rs as isize,
                rhs.add(offsets[tap]),
                rhs_cs as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        };
    });
    let (first, rest) = shares.split_at_mut(weight_len);
    let chunk = weight_len.div_ceil(threads).max(1024);
    first.par_chunks_mut(chunk).enumerate().for_each(|(index, total)| {
        let (start, len) = (index * chunk, total.len());
        for share in rest.chunks_exact(weight_len) {
            total.iter_mut().zip(&share[start..start + len]).for_each(|(t, s)| *t += s);
        }
    });
    shares.truncate(weight_len);
    shares
}
