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
            super::matmul(
                [rows, positions, c_out],
                (columns.as_mut_ptr(), positions, 1),
                (weight.as_ptr(), 1, rows),
                (grad[image * c_out * positions..].as_ptr(), positions, 1),
                1.0,
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

/// dL/dW ([c_out, c_in, kh, kw]) of a convolution, from its input `x` and dL/dy (`grad`): on
/// AVX-512 CPUs, for 3x3 kernels over at least 16 input channels, by
/// [`direct::weight_gradient`]; elsewhere by gemm ([`gemm_weight_gradient`]). Either way every
/// value is summed in one fixed order, whatever the thread pool does (training must repeat
/// itself exactly).
pub(in super::super) fn weight_gradient(x: &[f32], grad: &[f32], shape: &ConvShape) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if let Some(values) = direct::weight_gradient(x, grad, shape) {
        return values;
    }
    gemm_weight_gradient(x, grad, shape)
}

/// The weight gradient by gemm: for each image and tap, dW[:, :, tap] = G X_tap on the padded copy;
/// each image's share is computed apart and the shares are added in image order.
pub(in super::super) fn gemm_weight_gradient(x: &[f32], grad: &[f32], shape: &ConvShape) -> Vec<f32> {
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
            super::matmul(
                [rows, c_in, k],
                (out.at(image * weight_len + first_row * c_in * taps + tap), (c_in * taps), taps),
                (lhs.add(first_row * lhs_rs), lhs_rs, 1),
                (rhs.add(offsets[tap]), 1, rhs_cs),
                1.0,
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

/// The weight gradient without gemm's packing: each image's input is laid out padded (as for the
/// forward kernel) with 16 input channels interleaved per position ([block][position][16]), so
/// that for a tap at offset o, X'[q + o] is one 16-wide vector of input channels. A micro-tile
/// keeps ROWS output channels x TAPS taps x 16 input channels in registers and, per output
/// position q, multiplies the broadcast G[row][q] with the TAPS vectors X'[q + o_t]: every value
/// of the tile is a final dW value, accumulated over all images and positions (no shares to add,
/// no horizontal sums). Tasks take one block of 16 input channels and a group of row blocks, and
/// go image by image, chunk by chunk of positions, every tile of the task per chunk (its input
/// chunk then stays in L1, its gradient rows in L2).
#[cfg(target_arch = "x86_64")]
mod direct {
    use super::super::{ConvShape, PaddedLayout, pad_phases};
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// Input channels per vector.
    const LANES: usize = 16;
    /// Output positions per chunk: a task's input chunk ((CHUNK + reach) x 16 floats) stays in L1.
    const CHUNK: usize = 256;

    /// None where it does not apply (the caller takes gemm's path).
    pub(super) fn weight_gradient(x: &[f32], grad: &[f32], shape: &ConvShape) -> Option<Vec<f32>> {
        let taps = shape.kernel[0] * shape.kernel[1];
        // 1x1s stay on gemm: a 12 x 1 tile was measured 2-2.5x slower than gemm there.
        if !std::arch::is_x86_feature_detected!("avx512f") || shape.channels_in < LANES || taps != 9 {
            return None;
        }
        Some(compute::<3, 9>(x, grad, shape))
    }

    fn compute<const ROWS: usize, const TAPS: usize>(x: &[f32], grad: &[f32], shape: &ConvShape) -> Vec<f32> {
        let (batch, c_in, c_out) = (shape.batch, shape.channels_in, shape.channels_out);
        let (out_h, out_w) = (shape.out_h(), shape.out_w());
        let PaddedLayout { phase_h, phase_w, tail, channel_len, offsets, span, reach } = shape.padded_layout();
        debug_assert_eq!(offsets.len(), TAPS);
        let blocks = c_in.div_ceil(LANES);
        // Positions per interleaved block: the last chunk reads up to reach past span.
        let positions = channel_len.max(span + reach);
        let block_len = positions * LANES;
        let input_len = c_in * shape.height * shape.width;
        // X': [image][block][position][lane], lanes past c_in zero.
        let mut interleaved = vec![0f32; batch * blocks * block_len];
        interleaved.par_chunks_mut(block_len).enumerate().for_each_init(
            Vec::new,
            |planes: &mut Vec<f32>, (index, out)| {
                let (image, block) = (index / blocks, index % blocks);
                let lanes = LANES.min(c_in - block * LANES);
                let first = image * input_len + block * LANES * shape.height * shape.width;
                let source = &x[first..first + lanes * shape.height * shape.width];
                planes.resize(lanes * channel_len, 0.0);
                pad_phases(source, planes, shape, [phase_h, phase_w, tail], false);
                for (lane, plane) in planes.chunks_exact(channel_len).enumerate() {
                    for (p, &value) in plane.iter().enumerate() {
                        out[p * LANES + lane] = value;
                    }
                }
            },
        );
        // G on the padded grid: [image][c_out][span], dropped positions zero (a 1x1 reads grad).
        let grid: Vec<f32>;
        let grid: &[f32] = if span == out_h * out_w {
            grad
        } else {
            let mut g = vec![0f32; batch * c_out * span];
            g.par_chunks_mut(span).zip(grad.par_chunks(out_h * out_w)).for_each(|(rows, source)| {
                for (row, source) in rows.chunks_exact_mut(phase_w).zip(source.chunks_exact(out_w)) {
                    row[..out_w].copy_from_slice(source);
                }
            });
            grid = g;
            &grid
        };
        let row_blocks = c_out.div_ceil(ROWS);
        let threads = rayon::current_num_threads().max(1);
        let groups = (2 * threads).div_ceil(blocks).clamp(1, row_blocks);
        let group_len = row_blocks.div_ceil(groups);
        let vector_offsets: [usize; TAPS] = std::array::from_fn(|t| offsets[t] * LANES);
        // Per task: its tiles' values, [row block][ROWS][TAPS][LANES].
        let results: Vec<(usize, usize, Vec<f32>)> = (0..blocks * groups)
            .into_par_iter()
            .map(|task| {
                let (block, group) = (task / groups, task % groups);
                let first_row_block = group * group_len;
                let tiles = group_len.min(row_blocks.saturating_sub(first_row_block));
                let mut acc = vec![0f32; tiles * ROWS * TAPS * LANES];
                for image in 0..batch {
                    let input = interleaved[(image * blocks + block) * block_len..].as_ptr();
                    let g_image = &grid[image * c_out * span..(image + 1) * c_out * span];
                    for q0 in (0..span).step_by(CHUNK) {
                        let q1 = (q0 + CHUNK).min(span);
                        for tile in 0..tiles {
                            let row0 = (first_row_block + tile) * ROWS;
                            // Rows past c_out repeat the last (computed, never written out).
                            let g_rows: [*const f32; ROWS] =
                                std::array::from_fn(|r| g_image[(row0 + r).min(c_out - 1) * span..].as_ptr());
                            // SAFETY: the CPU has AVX-512F (checked by the caller); g rows hold
                            // span values (q < q1 <= span); the input reads position q + offset
                            // < span + reach <= positions of this block; the tile's
                            // ROWS x TAPS x LANES values lie within `acc`.
                            unsafe {
                                micro_kernel::<ROWS, TAPS>(
                                    &g_rows,
                                    input,
                                    &vector_offsets,
                                    q0,
                                    q1,
                                    acc.as_mut_ptr().add(tile * ROWS * TAPS * LANES),
                                )
                            };
                        }
                    }
                }
                (block, first_row_block, acc)
            })
            .collect();
        let mut dw = vec![0f32; c_out * c_in * TAPS];
        for (block, first_row_block, acc) in results {
            for (tile, values) in acc.chunks_exact(ROWS * TAPS * LANES).enumerate() {
                for r in 0..ROWS {
                    let row = (first_row_block + tile) * ROWS + r;
                    if row >= c_out {
                        break;
                    }
                    for t in 0..TAPS {
                        for lane in 0..LANES.min(c_in - block * LANES) {
                            dw[(row * c_in + block * LANES + lane) * TAPS + t] = values[(r * TAPS + t) * LANES + lane];
                        }
                    }
                }
            }
        }
        dw
    }

    /// acc[r][t] (16 input channels) += sum over q in q0..q1 of g_rows[r][q] * input[q * 16 +
    /// offsets[t] ..][..16].
    #[target_feature(enable = "avx512f")]
    unsafe fn micro_kernel<const ROWS: usize, const TAPS: usize>(
        g_rows: &[*const f32; ROWS],
        input: *const f32,
        offsets: &[usize; TAPS],
        q0: usize,
        q1: usize,
        acc: *mut f32,
    ) {
        // SAFETY (every access below): within the bounds the caller guarantees.
        let mut sums: [[__m512; TAPS]; ROWS] = std::array::from_fn(|r| {
            std::array::from_fn(|t| unsafe { _mm512_loadu_ps(acc.add((r * TAPS + t) * LANES)) })
        });
        for q in q0..q1 {
            let base = unsafe { input.add(q * LANES) };
            let g: [__m512; ROWS] = std::array::from_fn(|r| _mm512_set1_ps(unsafe { *g_rows[r].add(q) }));
            for t in 0..TAPS {
                let x = unsafe { _mm512_loadu_ps(base.add(offsets[t])) };
                for r in 0..ROWS {
                    sums[r][t] = _mm512_fmadd_ps(g[r], x, sums[r][t]);
                }
            }
        }
        for r in 0..ROWS {
            for t in 0..TAPS {
                unsafe { _mm512_storeu_ps(acc.add((r * TAPS + t) * LANES), sums[r][t]) };
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::ConvShape;

    /// The direct weight-gradient kernel against the gemm one, on shapes where it applies (so
    /// that a dispatch falling back to gemm cannot pass unnoticed): output channels not a multiple
    /// of its 3-row tile, input channels not a multiple of 16, strided, unpadded, odd sides; within
    /// 1e-5 of the gradient's scale.
    #[test]
    fn direct_weight_gradient_matches_gemm() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut seed = 7u32;
        let mut random = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect()
        };
        for (batch, c_in, c_out, side, stride, padding) in
            [(2, 16, 8, 13, 1, 1), (1, 33, 7, 9, 2, 1), (3, 20, 12, 11, 1, 0), (2, 48, 5, 6, 2, 0)]
        {
            let shape = ConvShape {
                batch,
                channels_in: c_in,
                height: side,
                width: side,
                channels_out: c_out,
                kernel: [3, 3],
                stride: [stride, stride],
                padding: [padding, padding],
            };
            let x = random(batch * c_in * side * side);
            let grad = random(batch * c_out * shape.out_h() * shape.out_w());
            let direct = super::direct::weight_gradient(&x, &grad, &shape).expect("the direct kernel applies");
            let gemm = super::gemm_weight_gradient(&x, &grad, &shape);
            let scale = gemm.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = direct.iter().zip(&gemm).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
            assert!(worst < 1e-5, "{batch}x{c_in}->{c_out} {side}px s{stride} p{padding}: {worst} of the scale");
        }
    }
}
