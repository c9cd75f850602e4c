{{/* Names and labels shared by every template. */}}

{{- define "lockstep.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lockstep.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lockstep
{{- end -}}

{{/* Selector labels of one component: include with (list . "operator"). */}}
{{- define "lockstep.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ $root.Chart.Name }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "lockstep.image" -}}
{{- $root := index . 0 -}}
{{- printf "%s/%s/lockstep-%s:%s" $root.Values.image.registry $root.Values.image.repository (index . 1) ($root.Values.image.tag | default $root.Chart.AppVersion) -}}
{{- end -}}

{{- define "lockstep.operatorEndpoint" -}}
{{- if .Values.sidecar.operatorEndpoint -}}
{{- .Values.sidecar.operatorEndpoint -}}
{{- else if .Values.operator.enabled -}}
{{- printf "%s://%s-operator.%s.svc:%d" (ternary "https" "http" .Values.controlTls.enabled) (include "lockstep.fullname" .) .Release.Namespace (int .Values.operator.grpcPort) -}}
{{- end -}}
{{- end -}}
